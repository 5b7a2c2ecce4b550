"""A model whose every parameter is random, shared by the tests: the real init's zero class token and tiny
biases would hide mistakes in loading and in the forward pass."""

import torch

import vitkit


def randomized(cfg: vitkit.ViTConfig, seed: int = 0) -> vitkit.VisionTransformer:
    torch.manual_seed(seed)
    model = vitkit.VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model
