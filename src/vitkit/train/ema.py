"""An exponential moving average of the weights (Polyak averaging), evaluated and saved in place of the raw ones."""

from __future__ import annotations

import copy

import torch

from ..models import VisionTransformer


class ModelEma:
    def __init__(self, model: VisionTransformer, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: VisionTransformer) -> None:
        averaged, current = self.module.state_dict(), model.state_dict()
        for name, e in averaged.items():
            if e.dtype.is_floating_point:
                e.lerp_(current[name], 1 - self.decay)
            else:
                e.copy_(current[name])
