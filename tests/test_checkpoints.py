"""The loader core and the two formats that use vitkit's own names: vitkit and timm."""

import os
import pickle

import pytest
import torch
from randomized import randomized
from safetensors.torch import save_file

import vitkit
from vitkit.checkpoints import read_checkpoint
from vitkit.models import ViTConfig
from vitkit.models.posembed import resample_pos_embed


def tiny(**kw) -> ViTConfig:
    base = dict(img_size=(32, 32), patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, num_classes=5)
    base.update(kw)
    return ViTConfig(**base)


def assert_same(a: vitkit.VisionTransformer, b: vitkit.VisionTransformer, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pool": "gap", "class_token": False},
        {"pool": "gap", "fc_norm": True, "img_size": (32, 48)},
        {"representation_size": 16, "gelu": "tanh", "norm_eps": 1e-12},
        {"pos_embed": "sincos", "pool": "gap"},
        {"hybrid": (1, 1), "stem_width": 32, "patch_size": 1, "img_size": (64, 64), "in_chans": 1},
    ],
)
def test_native_round_trip_keeps_everything(tmp_path, kw):
    model = randomized(tiny(**kw))
    model.classes = ["a", "b", "c", "d", "e"]
    model.preprocess = model.preprocess.resized(model.cfg.img_size)
    vitkit.save_pretrained(model, tmp_path / "m")
    for path in (tmp_path / "m", tmp_path / "m" / "model.safetensors"):  # the directory or the weights alone
        back = vitkit.load_pretrained(path)
        assert back.cfg == model.cfg and back.classes == model.classes and back.preprocess == model.preprocess
        assert_same(model, back, torch.randn(2, model.cfg.in_chans, *model.cfg.img_size))
        assert not back.training and back.reinitialized == []


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_timm_state_dicts(tmp_path, suffix):
    model = randomized(tiny(pool="gap", fc_norm=True, class_token=False, img_size=(48, 48)))
    vitkit.save_pretrained(model, tmp_path / f"m{suffix}", to="timm")
    back = vitkit.load_pretrained(tmp_path / f"m{suffix}", heads=4)
    assert read_checkpoint(tmp_path / f"m{suffix}").source == "timm"
    assert back.cfg.pool == "gap" and back.cfg.fc_norm and back.cfg.grid == (6, 6)
    assert back.preprocess.interpolation == "bicubic" and back.preprocess.crop_pct == 0.9
    assert_same(model, back, torch.randn(2, 3, 48, 48))


def test_timm_wrapped_and_old_names(tmp_path):
    model = randomized(tiny(representation_size=16))
    sd = model.state_dict()
    old = {("module." + k).replace("pre_logits.fc.", "pre_logits."): v for k, v in sd.items()}
    torch.save({"model": old, "epoch": 3}, tmp_path / "train.pth")
    assert_same(model, vitkit.load_pretrained(tmp_path / "train.pth", heads=4), torch.randn(1, 3, 32, 32))


def test_hybrid_timm_uses_timm_stem_numerics(tmp_path):
    model = randomized(tiny(hybrid=(1,), stem_width=32, patch_size=1, img_size=(32, 32), stem_numerics="timm"))
    vitkit.save_pretrained(model, tmp_path / "h.pth", to="timm")
    back = vitkit.load_pretrained(tmp_path / "h.pth", heads=4)
    assert back.cfg.hybrid == (1,) and back.cfg.stem_width == 32 and back.cfg.stem_numerics == "timm"
    assert_same(model, back, torch.randn(1, 3, 32, 32))


def test_new_classes_reinitialise_the_head_and_say_so(tmp_path, caplog):
    model = randomized(tiny())
    vitkit.save_pretrained(model, tmp_path / "m")
    back = vitkit.load_pretrained(tmp_path / "m", num_classes=3)
    assert back.reinitialized == ["head.bias", "head.weight"]
    assert "re-initialised head.bias, head.weight" in caplog.text
    assert torch.equal(back.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    assert back(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert not back.head.weight.any() and not back.head.bias.any()  # zero, as the paper's fine-tuning (3.2)
    assert vitkit.create_model("vit_ti16", num_classes=3).head.weight.std() > 0.01  # a fresh model's is random
    no_pre = vitkit.load_pretrained(tmp_path / "m", num_classes=0)
    assert isinstance(no_pre.head, torch.nn.Identity) and no_pre.reinitialized == []


def test_new_image_size_resamples_position_embeddings(tmp_path):
    model = randomized(tiny())
    vitkit.save_pretrained(model, tmp_path / "m")
    for mode in ("bicubic", "bilinear"):
        back = vitkit.load_pretrained(tmp_path / "m", img_size=(48, 64), pos_interp=mode)
        expected = resample_pos_embed(model.pos_embed.detach(), (6, 8), (4, 4), 1, mode)
        assert torch.equal(back.pos_embed.detach(), expected)
        assert back.preprocess.img_size == (48, 64)


def test_dropping_pre_logits_as_official_fine_tuning(tmp_path):
    model = randomized(tiny(representation_size=16))
    vitkit.save_pretrained(model, tmp_path / "m")
    back = vitkit.load_pretrained(tmp_path / "m", representation_size=None, num_classes=2)
    assert isinstance(back.pre_logits, torch.nn.Identity) and back.head.in_features == 32


def test_conflicts_name_what_the_file_holds(tmp_path):
    vitkit.save_pretrained(randomized(tiny()), tmp_path / "m")
    shape = r"width=32 \(key 'patch_embed\.proj\.weight' has shape \(32, 3, 8, 8\)\)"
    with pytest.raises(ValueError, match=rf"the file holds {shape}; the override width=64"):
        vitkit.load_pretrained(tmp_path / "m", width=64)
    with pytest.raises(ValueError, match=rf"the file holds {shape}, but model 'vit_b16' has width=768"):
        vitkit.load_pretrained(tmp_path / "m", model="vit_b16")
    vitkit.save_pretrained(randomized(tiny(width=40, heads=5)), tmp_path / "t.pth", to="timm")
    with pytest.raises(ValueError, match="does not store the number of heads and width 40 is no named size"):
        vitkit.load_pretrained(tmp_path / "t.pth")


def test_model_argument_settles_heads(tmp_path):
    model = randomized(tiny(width=192, heads=3, mlp_dim=768, depth=1))
    vitkit.save_pretrained(model, tmp_path / "t.pth", to="timm")
    assert vitkit.load_pretrained(tmp_path / "t.pth").cfg.heads == 3  # by width: the Ti size
    assert vitkit.load_pretrained(tmp_path / "t.pth", heads=6).cfg.heads == 6


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": Exploit()}, tmp_path / f"evil{suffix}")
    with pytest.raises(ValueError, match=rf"evil\{suffix}: refused to load"):
        vitkit.load_pretrained(tmp_path / f"evil{suffix}")
    assert not marker.exists()
    with open(tmp_path / f"evil2{suffix}", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(Exploit(), f, protocol=2)
    with pytest.raises(ValueError, match=rf"evil2\{suffix}"):
        vitkit.load_pretrained(tmp_path / f"evil2{suffix}")
    assert not marker.exists()


def test_corrupt_and_unknown_files(tmp_path):
    model = randomized(tiny())
    vitkit.save_pretrained(model, tmp_path / "m.safetensors", to="timm")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        vitkit.load_pretrained(tmp_path / "cut.safetensors")
    save_file({"conv.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other\.safetensors: unrecognised checkpoint layout"):
        vitkit.load_pretrained(tmp_path / "other.safetensors")
    sd = model.state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(65, 32)
    torch.save(sd, tmp_path / "bad_shape.pth")
    shapes = r"'blocks\.1\.mlp\.fc1\.weight' has shape \(65, 32\), the model expects \(64, 32\)"
    with pytest.raises(ValueError, match=shapes):
        vitkit.load_pretrained(tmp_path / "bad_shape.pth", heads=4)
    del sd["blocks.1.mlp.fc1.weight"], sd["blocks.0.norm2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.norm2\.bias', 'blocks\.1\.mlp\.fc1\.weight'\]"):
        vitkit.load_pretrained(tmp_path / "missing.pth", heads=4)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth: no such file"):
        vitkit.load_pretrained(tmp_path / "nope.pth")


def test_non_square_file_without_stored_size_loads_at_the_size_asked(tmp_path):
    model = randomized(tiny(img_size=(32, 48)))
    vitkit.save_pretrained(model, tmp_path / "t.pth", to="timm")  # a timm state dict does not store its size
    with pytest.raises(ValueError, match="not a square grid; pass img_size"):
        vitkit.load_pretrained(tmp_path / "t.pth", heads=4)
    back = vitkit.load_pretrained(tmp_path / "t.pth", heads=4, img_size=(32, 48))
    assert back.reinitialized == []
    assert_same(model, back, torch.randn(1, 3, 32, 48))
