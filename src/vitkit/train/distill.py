"""Knowledge distillation: the teachers' class probabilities mixed into the training targets.

The student trains on `(1 - weight) * targets + weight * teacher`, where `teacher` is the mean of the teachers'
probabilities for the very images the student sees (after cropping, RandAugment and mixup), or with `hard` the
one-hot of their top class (DeiT's hard distillation, without its extra token). Since the loss is the cross-entropy
against soft targets, soft distillation at temperature 1 is exactly the KL divergence to the teachers plus a
constant. Teachers are any checkpoints vitkit loads with the run's classes; each sees the batch at its own input
size and normalisation, and none of them is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoints import load_pretrained
from ..evaluate import autocast, inference_model
from ..models import VisionTransformer
from ..preprocess import Preprocess
from .config import DistillConfig


class Teachers:
    def __init__(self, models: list[VisionTransformer], student_prep: Preprocess, cfg: DistillConfig, amp):
        self.models, self.student_prep, self.amp = models, student_prep, amp
        self.weight, self.hard = cfg.weight, cfg.hard

    @classmethod
    def load(
        cls, cfg: DistillConfig, classes: list[str], student: VisionTransformer, device: torch.device, precision: str
    ) -> Teachers | None:
        """The teachers of `cfg` in eval mode on `device`, or None without any.

        Raises:
            ValueError: a teacher with other classes or another number of image channels than the student's.
        """
        if not cfg.teachers:
            return None
        models = []
        for path in cfg.teachers:
            model = load_pretrained(path)
            k, chans = model.cfg.num_classes, model.cfg.in_chans
            if k != len(classes) or (model.classes and list(model.classes) != list(classes)):
                names = model.classes or f"{k} unnamed classes"
                raise ValueError(f"distill.teachers: {path} predicts {names}; the training data has {list(classes)}")
            if chans != student.cfg.in_chans:
                raise ValueError(
                    f"distill.teachers: {path} takes {chans}-channel images; the student takes {student.cfg.in_chans}"
                )
            models.append(inference_model(model, device, "fp32"))
        return cls(models, student.preprocess, cfg, autocast(device, precision))

    @torch.no_grad()
    def targets(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The student's targets for the normalised batch `x` (its input), its label targets mixed with the
        teachers' prediction."""
        probs = torch.stack([self._probs(m, x) for m in self.models]).mean(dim=0)
        if self.hard:
            probs = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        return (1 - self.weight) * targets + self.weight * probs

    def _probs(self, model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        prep = model.preprocess
        x = renormalize(x, self.student_prep, prep)
        if tuple(x.shape[-2:]) != prep.img_size:
            x = F.interpolate(x, size=prep.img_size, mode="bilinear", antialias=True, align_corners=False)
        with self.amp:
            return model(x).float().softmax(dim=-1)


def renormalize(x: torch.Tensor, source: Preprocess, target: Preprocess) -> torch.Tensor:
    """A batch normalised with `source`'s mean and std, normalised with `target`'s instead."""
    if (source.mean, source.std) == (target.mean, target.std):
        return x
    view = (1, -1, 1, 1)
    mean_s, std_s, mean_t, std_t = (
        torch.tensor(v, dtype=x.dtype, device=x.device).view(view)
        for v in (source.mean, source.std, target.mean, target.std)
    )
    return (x * std_s + mean_s - mean_t) / std_t
