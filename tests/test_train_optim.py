import math

import pytest
import torch

from vitkit import create_model
from vitkit.train.config import OptimConfig, ScheduleConfig
from vitkit.train.optim import build_optimizer, freeze, layer_id, lr_at, param_groups, set_lr


def tiny(depth=3):
    return create_model(
        "vit_ti16", img_size=16, patch_size=4, width=32, depth=depth, heads=2, mlp_dim=64, num_classes=5
    )


def test_weight_decay_skips_norms_biases_position_embeddings_and_class_token():
    model = tiny()
    groups = param_groups(model, 0.05, None)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias", "head.bias"} <= no_decay
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")}
    assert "patch_embed.proj.weight" in decay and "head.weight" in decay


def test_layer_decay_scales_lr_by_depth():
    model = tiny(depth=3)
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.0, 0.5) for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.125
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.0625
    opt = build_optimizer(model, OptimConfig(lr=1.0, layer_decay=0.5))
    set_lr(opt, 0.2)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.0125, 0.025, 0.05, 0.1, 0.2])
    assert layer_id("blocks.10.norm1.weight", 12) == 11


def test_freeze_linear_probe_and_last_blocks():
    model = tiny(depth=3)
    freeze(model, "head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    model = tiny(depth=3)
    freeze(model, "last:1")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("blocks.2.", "norm.", "head.")) for n in trained) and "blocks.2.attn.qkv.weight" in trained
    assert not any(n.startswith(("blocks.1.", "patch_embed", "pos_embed")) for n in trained)
    opt = build_optimizer(model, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trained)


def test_optimizers_are_the_ones_named():
    model = tiny()
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimizers_match_the_reference_update(name):
    """The fused kernels vitkit uses against PyTorch's per-parameter loop, over groups with decay and lr scales.

    Both get the same gradients: through the model, the key bias (whose true gradient is 0) has a gradient of
    rounding noise that Adam scales up to whole steps, which would compare noise, not the update."""
    torch.manual_seed(0)
    fast, slow = tiny(), tiny()
    slow.load_state_dict(fast.state_dict())
    start = [p.detach().clone() for p in fast.parameters()]
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, layer_decay=0.7)
    fused = build_optimizer(fast, cfg)
    options = {k: v for k, v in fused.defaults.items() if k != "decoupled_weight_decay"}  # AdamW sets it itself
    reference = type(fused)(param_groups(slow, cfg.weight_decay, cfg.layer_decay), **options | {"fused": None})
    assert fused.param_groups[0]["fused"] and not reference.param_groups[0]["fused"]
    for opt in (fused, reference):
        set_lr(opt, cfg.lr)
    for _ in range(5):
        for p, q in zip(fast.parameters(), slow.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    moved = max((p - q).abs().max().item() for p, q in zip(fast.parameters(), start, strict=True))
    diff = max((p - q).abs().max().item() for p, q in zip(fast.parameters(), slow.parameters(), strict=True))
    assert moved > 1e-2 and diff < 1e-6


def test_schedule_warmup_then_cosine_or_linear():
    cos = ScheduleConfig(decay="cosine", min_lr=0.1)
    assert lr_at(0, 100, 10, 1.0, cos) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 1.0, cos) == pytest.approx(0.1)
    lin = ScheduleConfig(decay="linear")
    assert lr_at(30, 50, 0, 2.0, lin) == pytest.approx(2.0 * (1 - 30 / 50))
    assert lr_at(49, 50, 0, 2.0, ScheduleConfig(decay="constant")) == 2.0
