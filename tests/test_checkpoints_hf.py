"""Hugging Face transformers ViT: tiny random transformers models saved with save_pretrained, loaded by vitkit,
and their logits compared in float32; vitkit models written for transformers and read back."""

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.checkpoints import hf, read_checkpoint
from vitkit.models import ViTConfig
from vitkit.preprocess import Preprocess

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)


def hf_config(**kw) -> "transformers.ViTConfig":
    return transformers.ViTConfig(**{**TINY, "num_labels": 5, **kw})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.2), so that no logit is zero and every tensor matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def hf_classifier(tmp_path, name: str = "hf", **kw):
    model = randomized(transformers.ViTForImageClassification(hf_config(**kw)))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def images(h: int = 32, w: int = 32, c: int = 3) -> torch.Tensor:
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def assert_logits_match(ours: vitkit.VisionTransformer, theirs, x: torch.Tensor, **hf_kw) -> None:
    ref = theirs(x, **hf_kw).logits
    assert ref.abs().max() > 0.1  # a real comparison, not of two near-zero outputs
    assert max_diff(ours(x), ref) <= TOL


def rewrite(path, change) -> None:
    """Edit the tensors of a saved model directory in place."""
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---- reading: parity with transformers -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, img, fields",
    [
        ({}, (32, 32), {"heads": 4, "gelu": "exact", "norm_eps": 1e-12, "pool": "token"}),
        ({"image_size": [32, 48]}, (32, 48), {"img_size": (32, 48)}),
        ({"num_attention_heads": 2}, (32, 32), {"heads": 2}),
        ({"qkv_bias": False, "num_channels": 1, "layer_norm_eps": 1e-6}, (32, 32), {"in_chans": 1, "norm_eps": 1e-6}),
    ],
)
def test_classifier_logits_match(tmp_path, kw, img, fields):
    theirs, path = hf_classifier(tmp_path, **kw)
    ours = vitkit.load_pretrained(path)
    for key, value in fields.items():
        assert getattr(ours.cfg, key) == value, key
    assert ours.cfg.qkv_bias == theirs.config.qkv_bias and ours.reinitialized == []
    # No preprocessor_config.json: transformers' ViT default, a plain resize with mean = std = 0.5.
    assert ours.preprocess == Preprocess(img, (0.5,) * ours.cfg.in_chans, (0.5,) * ours.cfg.in_chans, "squash")
    assert_logits_match(ours, theirs, images(*img, c=ours.cfg.in_chans))


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_new", "gelu_fast"])
@torch.no_grad()
def test_tanh_gelu(tmp_path, act):
    # Larger MLP inputs (|x| ~ 2, where the two GELUs differ most) and logits, so that exact GELU fails clearly.
    theirs = randomized(transformers.ViTForImageClassification(hf_config(hidden_act=act)))
    for name, p in theirs.named_parameters():
        if re.search(r"(mlp\.fc1|intermediate\.dense|classifier)\.weight$", name):
            p.mul_(10)
    theirs.save_pretrained(tmp_path / "hf")
    x = images()
    ours = vitkit.load_pretrained(tmp_path / "hf")
    assert ours.cfg.gelu == "tanh"
    assert_logits_match(ours, theirs, x)
    assert max_diff(vitkit.load_pretrained(tmp_path / "hf", gelu="exact")(x), theirs(x).logits) > 1e-4


@pytest.mark.parametrize("size", [(48, 48), (48, 64), (40, 32)])
def test_resampled_img_size_matches_interpolate_pos_encoding(tmp_path, size):
    # transformers: F.interpolate(bicubic, align_corners=False, size=new grid, no antialias) at forward time.
    theirs, path = hf_classifier(tmp_path)
    ours = vitkit.load_pretrained(path, img_size=size)
    assert ours.cfg.img_size == size
    assert_logits_match(ours, theirs, images(*size), interpolate_pos_encoding=True)


def test_shrunk_img_size_matches_interpolate_pos_encoding(tmp_path):
    theirs, path = hf_classifier(tmp_path)
    assert_logits_match(
        vitkit.load_pretrained(path, img_size=16), theirs, images(16, 16), interpolate_pos_encoding=True
    )


@torch.no_grad()
def test_bare_model_features_and_average_pooling(tmp_path):
    theirs = randomized(transformers.ViTModel(hf_config(), add_pooling_layer=False))
    theirs.save_pretrained(tmp_path / "bare")
    x = images()
    tokens = theirs(x).last_hidden_state  # (B, 1 + 16, D)

    ours = vitkit.load_pretrained(tmp_path / "bare")
    assert ours.cfg.num_classes == 0 and ours.cfg.representation_size is None and ours.classes is None
    assert max_diff(ours.forward_features(x), tokens) <= TOL
    assert max_diff(ours(x), tokens[:, 0]) <= TOL

    gap = vitkit.load_pretrained(tmp_path / "bare", pool="gap")
    assert gap.cfg.pool == "gap" and not gap.cfg.fc_norm
    assert max_diff(gap(x), tokens[:, 1:].mean(dim=1)) <= TOL


@torch.no_grad()
def test_masked_image_modeling_encoder_loads_without_its_decoder(tmp_path):
    theirs = randomized(transformers.ViTForMaskedImageModeling(hf_config(encoder_stride=8)))
    theirs.save_pretrained(tmp_path / "mim")
    ours = vitkit.load_pretrained(tmp_path / "mim")
    x = images()
    assert ours.cfg.num_classes == 0
    assert max_diff(ours.forward_features(x), theirs.vit(x).last_hidden_state) <= TOL


def test_pooler_beside_a_classifier_is_left_out(tmp_path):
    # ViTForImageClassification's classifier reads the class token directly; a stray pooler must not become
    # a pre-logits layer in front of it.
    theirs, path = hf_classifier(tmp_path)
    rewrite(
        path,
        lambda t: t.update({"vit.pooler.dense.weight": torch.ones(32, 32), "vit.pooler.dense.bias": torch.ones(32)}),
    )
    ours = vitkit.load_pretrained(path)
    assert ours.cfg.representation_size is None
    assert_logits_match(ours, theirs, images())


@pytest.mark.parametrize("pooler_size", [None, 24])
@torch.no_grad()
def test_pooler_is_pre_logits(tmp_path, pooler_size):
    theirs = randomized(transformers.ViTModel(hf_config(pooler_output_size=pooler_size)))
    theirs.save_pretrained(tmp_path / "bare")
    x = images()
    pooled = theirs(x).pooler_output  # tanh(dense(class token))

    ours = vitkit.load_pretrained(tmp_path / "bare")
    assert ours.cfg.representation_size == (pooler_size or 32)
    assert max_diff(ours.forward_head(ours.forward_features(x), pre_logits=True), pooled) <= TOL
    assert max_diff(ours(x), pooled) <= TOL  # no head: forward ends at the pre-logits layer


@torch.no_grad()
def test_layer_norm_eps_1e12_is_used(tmp_path):
    # Tiny embeddings (token variance ~1e-7) make the LayerNorm eps matter: 1e-6 would be off by far more than TOL.
    theirs = randomized(transformers.ViTForImageClassification(hf_config()))
    emb = theirs.vit.embeddings
    for p in (emb.cls_token, emb.position_embeddings, *emb.patch_embeddings.projection.parameters()):
        p.mul_(1e-4)
    theirs.save_pretrained(tmp_path / "hf")
    x = images()

    ours = vitkit.load_pretrained(tmp_path / "hf")
    assert ours.cfg.norm_eps == 1e-12
    assert_logits_match(ours, theirs, x)
    wrong_eps = vitkit.load_pretrained(tmp_path / "hf", norm_eps=1e-6)
    assert max_diff(wrong_eps(x), theirs(x).logits) > 1e-2


def test_weight_file_alone(tmp_path):
    theirs, path = hf_classifier(tmp_path)
    x = images()
    # Beside its config.json, the file alone reads as the directory does.
    assert_logits_match(vitkit.load_pretrained(path / "model.safetensors"), theirs, x)

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(path / "model.safetensors", lone / "vit.safetensors")
    ckpt = read_checkpoint(lone / "vit.safetensors")
    assert ckpt.source == "hf" and "heads" not in ckpt.determined
    assert ckpt.defaults == {"norm_eps": 1e-12, "gelu": "exact", "pos_antialias": False}
    with pytest.raises(ValueError, match="does not store the number of heads and width 32"):
        vitkit.load_pretrained(lone / "vit.safetensors")
    assert_logits_match(vitkit.load_pretrained(lone / "vit.safetensors", heads=4), theirs, x)

    # pytorch_model.bin with the file names, and a torch.save of the module (transformers 5 names it differently).
    torch.save(load_file(path / "model.safetensors"), lone / "pytorch_model.bin")
    torch.save(theirs.state_dict(), lone / "state_dict.pth")
    for name in ("pytorch_model.bin", "state_dict.pth"):
        assert_logits_match(vitkit.load_pretrained(lone / name, heads=4), theirs, x)


def test_directory_with_bin_or_shards(tmp_path):
    theirs, path = hf_classifier(tmp_path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert_logits_match(vitkit.load_pretrained(path), theirs, images())

    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_logits_match(vitkit.load_pretrained(tmp_path / "sharded"), theirs, images())


def test_id2label_gives_classes(tmp_path):
    names = ["cat", "dog", "bird", "fish", "frog"]
    _, path = hf_classifier(tmp_path, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    assert vitkit.load_pretrained(path).classes == names
    _, placeholders = hf_classifier(tmp_path, "placeholders")  # LABEL_0 ... LABEL_4
    assert vitkit.load_pretrained(placeholders).classes is None


def test_preprocessor_config_is_read_and_agrees_with_transformers(tmp_path):
    _, path = hf_classifier(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, resample=3, image_mean=mean, image_std=std
    )
    processor.save_pretrained(path)
    ours = vitkit.load_pretrained(path)
    assert ours.preprocess == Preprocess((32, 32), tuple(mean), tuple(std), "squash", 1.0, "bicubic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"][0]
    assert max_diff(ours.preprocess(image), pixels) <= TOL


# ---- writing ---------------------------------------------------------------------------------------------------
def tiny(**kw) -> ViTConfig:
    return ViTConfig(
        **{
            "img_size": (32, 32),
            "patch_size": 8,
            "width": 32,
            "depth": 2,
            "heads": 4,
            "mlp_dim": 64,
            "pos_antialias": False,
            **kw,
        }  # HF's numerics: no antialias when shrinking position embeddings
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"num_classes": 5},
        {"num_classes": 5, "img_size": (32, 48), "gelu": "tanh", "norm_eps": 1e-6, "qkv_bias": False},
        {"num_classes": 0, "representation_size": 24},
    ],
)
@torch.no_grad()
def test_round_trip_through_transformers(tmp_path, kw):
    model = randomized(vitkit.VisionTransformer(tiny(**kw)))
    if model.cfg.num_classes:
        model.classes = ["a", "b", "c", "d", "e"]
    model.preprocess = Preprocess(model.cfg.img_size, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), interpolation="bicubic")
    vitkit.save_pretrained(model, tmp_path / "hf", to="hf")
    x = images(*model.cfg.img_size)

    if model.cfg.num_classes:
        theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
        assert theirs.config.id2label == dict(enumerate(model.classes))
        assert_logits_match(model, theirs, x)
    else:
        theirs = transformers.ViTModel.from_pretrained(tmp_path / "hf").eval()
        assert max_diff(model(x), theirs(x).pooler_output) <= TOL
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert max_diff(model.preprocess(image), processor(image, return_tensors="pt")["pixel_values"][0]) <= TOL

    back = vitkit.load_pretrained(tmp_path / "hf")
    assert back.cfg == model.cfg and back.classes == model.classes and back.preprocess == model.preprocess
    ours, theirs_sd = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs_sd.keys() and all(torch.equal(ours[k], theirs_sd[k]) for k in ours)


def test_shorter_resize_is_written_as_shortest_edge_and_crop(tmp_path):
    model = vitkit.VisionTransformer(tiny(num_classes=5))
    model.preprocess = Preprocess((32, 32), resize="shorter", crop_pct=0.8, interpolation="bicubic")
    vitkit.save_pretrained(model, tmp_path / "hf", to="hf")
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    assert max_diff(model.preprocess(image), processor(image, return_tensors="pt")["pixel_values"][0]) <= TOL
    assert vitkit.load_pretrained(tmp_path / "hf").preprocess == model.preprocess


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"pool": "gap"}, "pool"),
        ({"pool": "gap", "fc_norm": True}, "pool"),
        ({"pool": "gap", "class_token": False}, "class_token"),
        ({"pos_embed": "sincos"}, "pos_embed"),
        ({"hybrid": (), "patch_size": 2, "stem_width": 32}, "hybrid"),
        ({"representation_size": 16}, "representation_size"),
    ],
)
def test_write_refuses_what_transformers_cannot_express(tmp_path, kw, field):
    model = vitkit.VisionTransformer(tiny(num_classes=5, **kw))
    with pytest.raises(ValueError, match=rf"ViTConfig\.{field}="):
        hf.write(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- detection and errors --------------------------------------------------------------------------------------
def test_matches_transformers_names_only(tmp_path):
    cls = transformers.ViTForImageClassification(hf_config(num_hidden_layers=1))
    cls.save_pretrained(tmp_path)
    on_disk = set(load_file(tmp_path / "model.safetensors"))  # transformers renames its modules when it saves
    assert hf.matches(on_disk)
    assert hf.matches({k.removeprefix("vit.") for k in on_disk if k.startswith("vit.")})  # bare ViTModel
    assert hf.matches(set(cls.state_dict()))  # transformers 5 in-memory names
    assert not hf.matches(set(vitkit.VisionTransformer(tiny()).state_dict()))  # timm / vitkit
    torchvision = {"conv_proj.weight", "class_token", "encoder.layers.encoder_layer_0.ln_1.weight", "heads.head.weight"}
    assert not hf.matches(torchvision)
    dinov2 = {"embeddings.patch_embeddings.projection.weight", "encoder.layer.0.norm1.weight"}
    assert not hf.matches(dinov2)
    assert not hf.matches({k.replace("vit.", "deit.") for k in on_disk})


def test_missing_key_and_wrong_shape_name_the_file_and_key(tmp_path):
    _, path = hf_classifier(tmp_path)
    key = "vit.encoder.layer.1.attention.attention.key.weight"
    rewrite(path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=re.escape(f"model.safetensors: key '{key}' is missing")):
        vitkit.load_pretrained(path)

    _, path = hf_classifier(tmp_path, "shape")
    rewrite(path, lambda t: t.update({key: torch.zeros(32, 31)}))
    with pytest.raises(ValueError, match=re.escape(f"key '{key}' has shape (32, 31), expected (32, 32)")):
        vitkit.load_pretrained(path)
    fc1 = "vit.encoder.layer.1.intermediate.dense.weight"
    rewrite(path, lambda t: t.update({key: torch.zeros(32, 32), fc1: torch.zeros(48, 32)}))
    with pytest.raises(ValueError, match=re.escape(f"key '{fc1}' has shape (48, 32), expected (64, 32)")):
        vitkit.load_pretrained(path)


def test_truncated_file_and_bad_config_are_clear(tmp_path):
    _, path = hf_classifier(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        vitkit.load_pretrained(path)
    weights.write_bytes(data)

    config = path / "config.json"
    original = config.read_text()
    for old, new, message in [
        ('"hidden_act": "gelu"', '"hidden_act": "quick_gelu"', "config.json: hidden_act='quick_gelu'"),
        (
            '"num_hidden_layers": 2',
            '"num_hidden_layers": 3',
            "config.json: num_hidden_layers=3, but model.safetensors holds 2",
        ),
        ('"image_size": 32', '"image_size": 48', "config.json: image_size=48 makes a 6x6 grid"),
        ('"model_type": "vit"', '"model_type": "deit"', "config.json: model_type='deit'"),
    ]:
        assert old in original
        config.write_text(original.replace(old, new))
        with pytest.raises(ValueError, match=re.escape(message)):
            vitkit.load_pretrained(path)
