"""Hugging Face transformers ViT: config.json and preprocessor_config.json, read and written.

What the weights of a transformers ViT do not say (heads, image size, LayerNorm eps, the GELU, dropout, class
names, and how images are resized and normalised) lives in these two files; `hf` reads and writes the weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..models import VisionTransformer, ViTConfig
from ..preprocess import HALF, Preprocess
from .files import read_json

log = logging.getLogger("vitkit")

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"

# transformers' `hidden_act` -> vitkit's gelu; gelu_new, gelu_fast and gelu_accurate write out the same tanh
# formula that gelu_pytorch_tanh runs fused.
GELU = {
    "gelu": "exact",
    "gelu_python": "exact",
    "gelu_pytorch_tanh": "tanh",
    "gelu_python_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
}
GELU_NAME = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes, as image processors store them
# The JSON types of the keys vitkit reads from config.json and preprocessor_config.json.
NUMBER, SIZE = (int, float), (int, dict, type(None))
CONFIG_TYPES = {
    "model_type": (str,),
    "hidden_size": (int,),
    "num_hidden_layers": (int,),
    "intermediate_size": (int,),
    "num_channels": (int,),
    "num_attention_heads": (int,),
    "patch_size": (int, list),
    "image_size": (int, list),
    "qkv_bias": (bool,),
    "hidden_act": (str,),
    "pooler_act": (str,),
    "layer_norm_eps": NUMBER,
    "hidden_dropout_prob": NUMBER,
    "attention_probs_dropout_prob": NUMBER,
    "id2label": (dict, type(None)),
}
PREPROCESSOR_TYPES = {
    "resample": (int,),
    "do_rescale": (bool,),
    "rescale_factor": NUMBER,
    "do_normalize": (bool,),
    "do_center_crop": (bool, type(None)),
    "image_mean": (*NUMBER, list),
    "image_std": (*NUMBER, list),
    "size": SIZE,
    "crop_size": SIZE,
}


def read_config(path: Path) -> tuple[dict[str, Any], Path]:
    """config.json beside the weights ({} when there is none or it is not a transformers config)."""
    file = (path if path.is_dir() else path.parent) / CONFIG
    if not file.exists():
        return {}, file
    config = read_json(file, CONFIG_TYPES)
    if "model_type" not in config:
        log.info("%s: not a transformers config (no model_type); ignored", file)
        return {}, file
    if config["model_type"] != "vit":
        raise ValueError(f"{file}: model_type={config['model_type']!r}; vitkit reads plain ViTs (model_type 'vit')")
    return config, file


def from_config(
    config: dict[str, Any], file: Path, weights: Path, sd: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any], list[str] | None]:
    """(determined, defaults, classes) from config.json `file`, after checking it agrees with the `weights`."""
    width, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    held = {
        "hidden_size": width,
        "num_hidden_layers": sum(k.endswith(".norm1.weight") for k in sd),
        "intermediate_size": sd["blocks.0.mlp.fc1.weight"].shape[0],
        "num_channels": in_chans,
        "patch_size": (patch, patch),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }
    for key, value in held.items():
        said = _pair(config[key], key, file) if key == "patch_size" and key in config else config.get(key, value)
        if said != value:
            raise ValueError(f"{file}: {key}={config[key]!r}, but {weights.name} holds {value!r}")
    act = config.get("hidden_act", "gelu")
    if act not in GELU:
        raise ValueError(f"{file}: hidden_act={act!r} is not a GELU vitkit runs; known: {sorted(GELU)}")
    if "pre_logits.fc.weight" in sd and config.get("pooler_act", "tanh") != "tanh":
        raise ValueError(f"{file}: pooler_act={config['pooler_act']!r}; vitkit's pre-logits layer is Linear + tanh")
    img_size = _pair(config.get("image_size", 224), "image_size", file)
    grid = (img_size[0] // patch, img_size[1] // patch)
    if grid[0] * grid[1] + 1 != sd["pos_embed"].shape[1]:
        raise ValueError(
            f"{file}: image_size={config.get('image_size', 224)!r} makes a {grid[0]}x{grid[1]} grid of "
            f"{patch}-pixel patches, but position_embeddings hold {sd['pos_embed'].shape[1] - 1} positions"
        )
    determined = {
        "img_size": img_size,
        "in_chans": in_chans,
        "qkv_bias": held["qkv_bias"],
    }
    if "num_attention_heads" in config:
        determined["heads"] = int(config["num_attention_heads"])
    defaults = {
        "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "gelu": GELU[act],
        "dropout": float(config.get("hidden_dropout_prob", 0.0)),
        "attn_dropout": float(config.get("attention_probs_dropout_prob", 0.0)),
        "pos_antialias": False,
    }
    return determined, defaults, _classes(config, file) if "head.weight" in sd else None


def _pair(value: Any, key: str, file: Path) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if key == "patch_size" and value[0] != value[1]:
            raise ValueError(f"{file}: patch_size={value!r}; vitkit's patches are square")
        return (value[0], value[1])
    raise ValueError(f"{file}: {key}={value!r}; expected an int or [height, width]")


def _classes(config: dict[str, Any], file: Path) -> list[str] | None:
    """Class names from id2label, or None for transformers' placeholders LABEL_0, LABEL_1, ..."""
    id2label = config.get("id2label") or {}
    try:
        labels = {int(i): str(name) for i, name in id2label.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: id2label has keys that are not class indices ({e})") from e
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{file}: id2label indices {sorted(labels)[:8]} are not 0..{len(labels) - 1}")
    classes = [labels[i] for i in range(len(labels))]
    if not classes or all(name == f"LABEL_{i}" for i, name in enumerate(classes)):
        return None
    return classes


def read_preprocess(path: Path) -> Preprocess | None:
    """preprocessor_config.json beside the weights; None without one (the loader then uses transformers' default:
    a plain resize to the input size, bilinear, mean = std = 0.5)."""
    file = (path if path.is_dir() else path.parent) / PREPROCESSOR
    if not file.exists():
        return None
    d = read_json(file, PREPROCESSOR_TYPES)

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{file}: {key}={d.get(key)!r}; {why}")

    interpolation = RESAMPLE.get(d.get("resample", 2))
    if interpolation is None:
        raise bad("resample", "vitkit resizes bilinear (2) or bicubic (3), PIL's codes")
    if not d.get("do_rescale", True):
        raise bad("do_rescale", "vitkit scales pixels by 1/255")
    if not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255):
        raise bad("rescale_factor", "vitkit scales pixels by 1/255")
    mean, std = (
        list(v) if isinstance(v, (list, tuple)) else [v] * 3
        for v in (d.get("image_mean", HALF), d.get("image_std", HALF))
    )
    if not d.get("do_normalize", True):
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    size, crop = (_size_dict(d.get(k)) for k in ("size", "crop_size"))
    for key, sizes in (("size", size), ("crop_size", crop)):
        if sizes is not None and not all(type(v) is int and v >= 1 for v in sizes.values()):
            raise bad(key, "expected sizes in pixels (integers >= 1)")
    crop = crop if d.get("do_center_crop") else None
    if size is None:  # the processor's default
        size = {"height": 224, "width": 224}
    if {"height", "width"} <= size.keys():
        resized = (size["height"], size["width"])
        if crop is not None and (crop.get("height"), crop.get("width")) != resized:
            raise bad("crop_size", f"a centre crop after resizing to {resized} regardless of aspect is not supported")
        return _preprocess(file, resized, mean, std, "squash", 1.0, interpolation)
    if "shortest_edge" in size and crop is not None and {"height", "width"} <= crop.keys():
        # Shorter side to shortest_edge, then the centre crop: vitkit's "shorter" with crop_pct = crop / edge.
        cropped = (crop["height"], crop["width"])
        return _preprocess(file, cropped, mean, std, "shorter", max(cropped) / size["shortest_edge"], interpolation)
    raise bad("size", "expected {height, width}, or shortest_edge with a centre crop to {height, width}")


def _size_dict(size: Any) -> dict[str, int] | None:
    return {"height": size, "width": size} if isinstance(size, int) else size


def _preprocess(file: Path, *args: Any) -> Preprocess:
    try:
        return Preprocess(*args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: preprocessing vitkit cannot follow ({e})") from e


def check_expressible(cfg: ViTConfig) -> None:
    unsupported = {
        "hybrid": (cfg.hybrid is not None, "transformers' ViT has no ResNet stem (ViT-hybrid is another model type)"),
        "pos_embed": (cfg.pos_embed != "learn", "transformers' ViT stores learned position embeddings only"),
        "class_token": (not cfg.class_token, "transformers' ViT always prepends a class token"),
        "pool": (cfg.pool != "token", "transformers' ViT classifies (and pools) the class token"),
        "fc_norm": (cfg.fc_norm, "transformers' ViT normalises every token before pooling"),
        "representation_size": (
            bool(cfg.representation_size and cfg.num_classes),
            "ViTForImageClassification's classifier reads the class token with no pre-logits layer; drop it "
            "(representation_size=None) or write the model without a head (num_classes=0), whose pre-logits layer "
            "becomes ViTModel's pooler",
        ),
    }
    for name, (refused, why) in unsupported.items():
        if refused:
            raise ValueError(f"cannot write ViTConfig.{name}={getattr(cfg, name)!r} as a Hugging Face ViT: {why}")


def _config_of(model: VisionTransformer, dtype: str) -> dict[str, Any]:
    cfg = model.cfg
    h, w = cfg.img_size
    config: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if cfg.num_classes else "ViTModel"],
        "model_type": "vit",
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": GELU_NAME[cfg.gelu],
        "layer_norm_eps": cfg.norm_eps,
        "image_size": h if h == w else [h, w],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "dtype": dtype.removeprefix("torch."),
    }
    if cfg.num_classes:
        names = model.classes if model.classes and len(model.classes) == cfg.num_classes else None
        names = names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    if cfg.representation_size:
        config.update(pooler_output_size=cfg.representation_size, pooler_act="tanh")
    return config


def _preprocessor_of(prep: Preprocess) -> dict[str, Any]:
    """A ViTImageProcessor config. vitkit's "shorter" resize becomes transformers' shortest_edge resize and
    centre crop (square inputs only; the long side of the resized image may differ by a pixel, as transformers
    truncates where vitkit rounds)."""
    h, w = prep.img_size
    out = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w},
        "resample": {v: k for k, v in RESAMPLE.items()}[prep.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }
    if prep.resize == "shorter":
        if h != w:
            raise ValueError(
                f"cannot write Preprocess(resize='shorter', img_size={prep.img_size}) for transformers: its "
                "shortest-edge resize and centre crop match vitkit's for square inputs only"
            )
        out.update(
            size={"shortest_edge": round(h / prep.crop_pct)}, do_center_crop=True, crop_size={"height": h, "width": w}
        )
    return out


def documents(model: VisionTransformer, dtype: str) -> dict[str, dict[str, Any]]:
    """File name -> the JSON transformers reads beside the weights of `model` (stored as `dtype`)."""
    return {CONFIG: _config_of(model, dtype), PREPROCESSOR: _preprocessor_of(model.preprocess)}
