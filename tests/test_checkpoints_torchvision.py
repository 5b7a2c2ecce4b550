"""torchvision checkpoints: a reference forward written from torchvision's VisionTransformer, run on a random
torchvision-named state dict, against vitkit loading the same file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vitkit
from vitkit.checkpoints import hf, load_pretrained, mindspore, read_checkpoint, timm, torchvision
from vitkit.preprocess import source_preprocess

IMG, PATCH, WIDTH, HEADS, DEPTH, MLP, CLASSES = 32, 8, 32, 4, 2, 64, 10


def torchvision_state_dict(seed: int = 0, old_mlp: bool = False, representation: int | None = None) -> dict:
    """Random weights under torchvision's names, scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    n = (IMG // PATCH) ** 2
    sd = {
        "class_token": rnd(1, 1, WIDTH, scale=0.5),
        "conv_proj.weight": rnd(WIDTH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH * PATCH)),
        "conv_proj.bias": rnd(WIDTH, scale=0.1),
        "encoder.pos_embedding": rnd(1, n + 1, WIDTH, scale=0.5),
        "encoder.ln.weight": 1 + rnd(WIDTH, scale=0.1),
        "encoder.ln.bias": rnd(WIDTH, scale=0.1),
    }
    fc1, fc2 = ("linear_1", "linear_2") if old_mlp else ("0", "3")
    for i in range(DEPTH):
        p = f"encoder.layers.encoder_layer_{i}."
        sd |= {
            p + "ln_1.weight": 1 + rnd(WIDTH, scale=0.1),
            p + "ln_1.bias": rnd(WIDTH, scale=0.1),
            p + "self_attention.in_proj_weight": rnd(3 * WIDTH, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + "self_attention.in_proj_bias": rnd(3 * WIDTH, scale=0.1),
            p + "self_attention.out_proj.weight": rnd(WIDTH, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + "self_attention.out_proj.bias": rnd(WIDTH, scale=0.1),
            p + "ln_2.weight": 1 + rnd(WIDTH, scale=0.1),
            p + "ln_2.bias": rnd(WIDTH, scale=0.1),
            p + f"mlp.{fc1}.weight": rnd(MLP, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + f"mlp.{fc1}.bias": rnd(MLP, scale=0.1),
            p + f"mlp.{fc2}.weight": rnd(WIDTH, MLP, scale=1 / math.sqrt(MLP)),
            p + f"mlp.{fc2}.bias": rnd(WIDTH, scale=0.1),
        }
    head_in = WIDTH
    if representation:
        sd["heads.pre_logits.weight"] = rnd(representation, WIDTH, scale=1 / math.sqrt(WIDTH))
        sd["heads.pre_logits.bias"] = rnd(representation, scale=0.1)
        head_in = representation
    sd["heads.head.weight"] = rnd(CLASSES, head_in, scale=1 / math.sqrt(head_in))
    sd["heads.head.bias"] = rnd(CLASSES, scale=0.1)
    return sd


def torchvision_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's VisionTransformer.forward, step by step, on a state dict (eps 1e-6, exact GELU)."""
    eps = 1e-6
    n = x.shape[0]
    x = F.conv2d(x, sd["conv_proj.weight"], sd["conv_proj.bias"], stride=PATCH)  # (n, D, h, w)
    x = x.reshape(n, WIDTH, -1).permute(0, 2, 1)  # (n, h*w, D)
    x = torch.cat([sd["class_token"].expand(n, -1, -1), x], dim=1)
    x = x + sd["encoder.pos_embedding"]
    for i in range(DEPTH):
        p = f"encoder.layers.encoder_layer_{i}."
        y = F.layer_norm(x, (WIDTH,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        y = y.transpose(0, 1)  # nn.MultiheadAttention(batch_first=True) runs the functional form on (L, N, E)
        y, _ = F.multi_head_attention_forward(
            y,
            y,
            y,
            WIDTH,
            HEADS,
            sd[p + "self_attention.in_proj_weight"],
            sd[p + "self_attention.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[p + "self_attention.out_proj.weight"],
            sd[p + "self_attention.out_proj.bias"],
            training=False,
            need_weights=False,
        )
        x = x + y.transpose(0, 1)
        y = F.layer_norm(x, (WIDTH,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        fc1, fc2 = ("linear_1", "linear_2") if p + "mlp.linear_1.weight" in sd else ("0", "3")
        y = F.gelu(F.linear(y, sd[p + f"mlp.{fc1}.weight"], sd[p + f"mlp.{fc1}.bias"]))
        x = x + F.linear(y, sd[p + f"mlp.{fc2}.weight"], sd[p + f"mlp.{fc2}.bias"])
    x = F.layer_norm(x, (WIDTH,), sd["encoder.ln.weight"], sd["encoder.ln.bias"], eps)[:, 0]
    if "heads.pre_logits.weight" in sd:
        x = torch.tanh(F.linear(x, sd["heads.pre_logits.weight"], sd["heads.pre_logits.bias"]))
    return F.linear(x, sd["heads.head.weight"], sd["heads.head.bias"])


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def save(sd: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))


def logit_diff(sd: dict, path) -> float:
    model = load_pretrained(path, heads=HEADS)
    x = images()
    with torch.no_grad():
        ours, ref = model(x), torchvision_forward(sd, x)
    assert ref.abs().max() > 0.5  # the comparison means something
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_logits_match_torchvision_forward(tmp_path, suffix):
    sd = torchvision_state_dict()
    path = tmp_path / f"vit_tiny{suffix}"
    save(sd, path)
    diff = logit_diff(sd, path)
    print(f"torchvision {suffix}: max |logit difference| = {diff:.2e}")
    assert diff <= 1e-5
    model = load_pretrained(path, heads=HEADS)
    assert (model.cfg.norm_eps, model.cfg.gelu) == (1e-6, "exact")
    assert (model.cfg.width, model.cfg.depth, model.cfg.mlp_dim, model.cfg.patch_size) == (WIDTH, DEPTH, MLP, PATCH)
    assert model.cfg.img_size == (IMG, IMG) and model.cfg.num_classes == CLASSES
    assert model.preprocess == source_preprocess("torchvision", (IMG, IMG))


def test_tensors_are_renamed_not_changed(tmp_path):
    sd = torchvision_state_dict()
    path = tmp_path / "vit.pth"
    save(sd, path)
    ckpt = read_checkpoint(path)
    assert ckpt.source == "torchvision" and ckpt.determined == {}
    assert len(ckpt.state_dict) == len(sd)
    p = "encoder.layers.encoder_layer_1."
    pairs = {
        "class_token": "cls_token",
        "encoder.pos_embedding": "pos_embed",
        p + "self_attention.in_proj_weight": "blocks.1.attn.qkv.weight",
        p + "mlp.3.weight": "blocks.1.mlp.fc2.weight",
        "heads.head.bias": "head.bias",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(ckpt.state_dict[ours], sd[theirs])


def test_older_mlp_names(tmp_path):
    sd = torchvision_state_dict(seed=2, old_mlp=True)
    path = tmp_path / "vit_old.pth"
    save(sd, path)
    diff = logit_diff(sd, path)
    print(f"torchvision mlp.linear_1/linear_2: max |logit difference| = {diff:.2e}")
    assert diff <= 1e-5


def test_pre_logits(tmp_path):
    sd = torchvision_state_dict(seed=3, representation=48)
    path = tmp_path / "vit_rep.pth"
    save(sd, path)
    diff = logit_diff(sd, path)
    print(f"torchvision heads.pre_logits: max |logit difference| = {diff:.2e}")
    assert diff <= 1e-5
    assert load_pretrained(path, heads=HEADS).cfg.representation_size == 48


def test_detection_keeps_torchvision_and_timm_apart(tmp_path):
    tv_keys = set(torchvision_state_dict())
    timm_model = vitkit.create_model(
        vitkit.ViTConfig(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP)
    )
    timm_keys = set(timm_model.state_dict())
    assert torchvision.matches(tv_keys) and not torchvision.matches(timm_keys)
    assert not timm.matches(tv_keys) and not hf.matches(tv_keys) and not mindspore.matches(tv_keys)
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    save(torchvision_state_dict(), tmp_path / "tv.pth")
    assert read_checkpoint(tmp_path / "timm.pth").source == "timm"
    assert read_checkpoint(tmp_path / "tv.pth").source == "torchvision"


def test_missing_key_names_file_and_key(tmp_path):
    sd = torchvision_state_dict()
    del sd["encoder.layers.encoder_layer_1.ln_2.weight"]
    path = tmp_path / "broken.pth"
    save(sd, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*encoder\.layers\.encoder_layer_1\.ln_2\.weight"):
        read_checkpoint(path)


def test_unknown_key_and_conv_stem_are_refused(tmp_path):
    sd = torchvision_state_dict()
    sd["encoder.layers.encoder_layer_0.extra.weight"] = torch.zeros(3)
    save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*encoder_layer_0\.extra\.weight"):
        read_checkpoint(tmp_path / "extra.pth")
    sd = torchvision_state_dict()
    sd["conv_proj.conv_last.weight"] = sd.pop("conv_proj.weight")
    save(sd, tmp_path / "stem.pth")
    with pytest.raises(ValueError, match=r"stem\.pth.*convolutional stem"):
        read_checkpoint(tmp_path / "stem.pth")
