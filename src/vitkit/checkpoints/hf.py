"""Hugging Face transformers ViT: a directory with `config.json` and `model.safetensors` (or `pytorch_model.bin`,
or their sharded `*.index.json`), or the weight file alone.

`ViTForImageClassification` nests the encoder under `vit.` and puts `classifier` beside it; a bare `ViTModel` has
no prefix and may hold `pooler.dense` (Linear + tanh on the class token), which is vitkit's pre-logits layer.
transformers' numerics (REFERENCE.md section 2): LayerNorm eps 1e-12 unless config.json says otherwise, exact
GELU for hidden_act "gelu", inputs normalised with mean = std = 0.5 and resized straight to the input size.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..models import VisionTransformer, ViTConfig
from ..preprocess import HALF, Preprocess
from .checkpoint import Checkpoint, require
from .files import read_json, read_safetensors, read_torch

log = logging.getLogger("vitkit")

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
# The weights of a model directory, in the order transformers looks for them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# On-disk name (under the encoder prefix) -> vitkit name. Modules map their `.weight` and `.bias` alike.
PARAMS = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}
MODULES = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}
BLOCK = {  # encoder.layer.{i}.<name> -> blocks.{i}.<name>
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# Special case: transformers keeps three projections; vitkit fuses them into one `attn.qkv` with rows q; k; v.
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# Special case: the pooler of a bare ViTModel is vitkit's pre-logits layer. A classifier bypasses it (it reads
# the class token directly), so beside a classifier it is dropped.
POOLER = ("pooler.dense", "pre_logits.fc")
HEAD = ("classifier", "head")  # beside the `vit.` prefix, not under it
# ViTForMaskedImageModeling's mask token and decoder: not part of an image classifier.
DROPPED = re.compile(r"^((vit\.)?embeddings\.mask_token|decoder\.)")

# transformers >= 5 names the block's modules differently in memory (`layers.{i}.attention.q_proj`) and renames
# them back when it saves, so files hold the names above; a torch.save(model.state_dict()) holds these.
IN_MEMORY_BLOCK = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}

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


# ---- reading -------------------------------------------------------------------------------------------------
def matches(keys: set[str]) -> bool:
    """Whether a flat state dict is a transformers ViT (ViTForImageClassification or a bare ViTModel)."""
    keys = {_file_name(k) for k in keys}
    return any(
        f"{p}embeddings.patch_embeddings.projection.weight" in keys
        and f"{p}encoder.layer.0.layernorm_before.weight" in keys
        for p in ("vit.", "")
    )


def read(path: Path) -> Checkpoint:
    """A model directory, or one of its weight files (config.json beside it is used when present)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: a Hugging Face model directory without weights; expected {WEIGHT_FILES}")
        path = found[0]
    tensors = _read_weights(path)
    if not matches(set(tensors)):
        raise ValueError(
            f"{path}: beside a config.json, so read as a Hugging Face model, but the keys (such as "
            f"{sorted(tensors)[:5]}) are not transformers' ViT names"
        )
    return from_tensors(tensors, path)


def from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    """Tensors under transformers' names, read from `path` -> a Checkpoint. config.json and
    preprocessor_config.json beside `path` say what the tensors do not."""
    path = Path(path)
    sd, names = to_vitkit_names(tensors, path)
    _check_shapes(sd, names, path)
    config, config_file = _read_config(path)
    # transformers resamples position embeddings bicubic without antialias (interpolate_pos_encoding).
    determined, defaults, classes = {}, {"norm_eps": 1e-12, "gelu": "exact", "pos_antialias": False}, None
    if config:
        determined, defaults, classes = _from_config(config, config_file, path, sd)
    prep = _read_preprocess(path)
    return Checkpoint(sd, "hf", str(path), determined, defaults, preprocess=prep, classes=classes)


def to_vitkit_names(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict under vitkit's names in float32, vitkit name -> the file's name). Every tensor the file must
    have is required; tensors with no place in the model are refused, except the few left out on purpose."""
    tensors = {_file_name(k): v for k, v in tensors.items()}
    prefix = "vit." if "vit.embeddings.patch_embeddings.projection.weight" in tensors else ""
    layers = (int(m[1]) for k in tensors if (m := re.match(rf"{prefix}encoder\.layer\.(\d+)\.", k)))
    depth = 1 + max(layers, default=-1)
    if depth == 0:
        raise ValueError(f"{path}: no transformer layers (keys `{prefix}encoder.layer.N.*`) found")

    taken = key_table(depth, prefix)  # file name -> vitkit name
    sd = {dst: require(tensors, src, path) for src, dst in taken.items()}
    width = sd["patch_embed.proj.weight"].shape[0]
    with_bias = f"{prefix}encoder.layer.0.{QKV[0]}.bias" in tensors
    for i in range(depth):
        for kind in ("weight", "bias") if with_bias else ("weight",):
            srcs = [f"{prefix}encoder.layer.{i}.{m}.{kind}" for m in QKV]
            sd[f"blocks.{i}.attn.qkv.{kind}"] = _fused_qkv(tensors, srcs, width, path)
            taken.update({src: f"blocks.{i}.attn.qkv.{kind}" for src in srcs})
    has_head = "classifier.weight" in tensors
    for (module, dst), pre in [(HEAD, "")] if has_head else [(POOLER, prefix)]:
        for kind in ("weight", "bias"):
            if (src := f"{pre}{module}.{kind}") in tensors:
                sd[f"{dst}.{kind}"], taken[src] = tensors[src], f"{dst}.{kind}"

    left = sorted(set(tensors) - set(taken))
    dropped = [k for k in left if DROPPED.match(k) or k.startswith(f"{prefix}pooler.")]
    unexpected = sorted(set(left) - set(dropped))
    if unexpected:
        raise ValueError(f"{path}: keys that are not part of a ViT: {unexpected[:8]}{' ...' * (len(unexpected) > 8)}")
    if dropped:
        log.info("%s: left out %s (a classifier bypasses the pooler; the MIM decoder is no use)", path, dropped)
    return {k: v.float() for k, v in sd.items()}, {dst: src for src, dst in taken.items()}


def _fused_qkv(tensors: dict[str, torch.Tensor], srcs: list[str], width: int, path: Path) -> torch.Tensor:
    """query, key, value (each (width, width) weights or (width,) biases) -> rows q; k; v."""
    parts = [require(tensors, src, path) for src in srcs]
    want = (width,) * (1 if srcs[0].endswith(".bias") else 2)
    for src, t in zip(srcs, parts, strict=True):
        if tuple(t.shape) != want:
            raise ValueError(f"{path}: key {src!r} has shape {tuple(t.shape)}, expected {want} (width {width})")
    return torch.cat(parts)  # (3 * width, ...)


def key_table(depth: int, prefix: str) -> dict[str, str]:
    """On-disk name -> vitkit name of every tensor of the encoder but q, k, v (see QKV)."""
    modules = dict(MODULES)
    for i in range(depth):
        modules.update({f"encoder.layer.{i}.{src}": f"blocks.{i}.{dst}" for src, dst in BLOCK.items()})
    table = {prefix + src: dst for src, dst in PARAMS.items()}
    for src, dst in modules.items():
        table.update({f"{prefix}{src}.{kind}": f"{dst}.{kind}" for kind in ("weight", "bias")})
    return table


def _file_name(key: str) -> str:
    """A transformers >= 5 in-memory name as the name in its files; other names unchanged."""
    m = re.match(r"^(vit\.)?layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m is None:
        return key
    module = IN_MEMORY_BLOCK.get(m[3], m[3])
    return f"{m[1] or ''}encoder.layer.{m[2]}.{module}.{m[4]}"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {tensor name: shard file}}
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: a shard index without a `weight_map`")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_weights(path.parent / shard))
        return tensors
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    return read_torch(path)


def _read_config(path: Path) -> tuple[dict[str, Any], Path]:
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


def _from_config(
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


def _check_shapes(sd: dict[str, torch.Tensor], names: dict[str, str], path: Path) -> None:
    """Every tensor against a ViT with this patch embedding and block 0's MLP; errors give the file's names."""
    width, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    cfg = ViTConfig(
        img_size=(patch, patch),
        patch_size=patch,
        in_chans=in_chans,
        width=width,
        heads=1,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        representation_size=sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(cfg).state_dict().items()}
    expected["pos_embed"] = (1, *sd["pos_embed"].shape[1:2], width)  # any length; the grid is checked on build
    for key, tensor in sd.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{path}: key {names[key]!r} has shape {tuple(tensor.shape)}, expected {expected[key]} "
                f"(width {width}, MLP {cfg.mlp_dim}, patch {patch}, {in_chans} channels)"
            )


def _read_preprocess(path: Path) -> Preprocess | None:
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


# ---- writing -------------------------------------------------------------------------------------------------
def write(model: VisionTransformer, path: Path) -> None:
    """A directory `transformers.ViTForImageClassification.from_pretrained` loads (`ViTModel` when the model has
    no head): config.json, model.safetensors and preprocessor_config.json.

    Raises:
        ValueError: the model has something transformers' ViT cannot express; the message names the field.
    """
    cfg = model.cfg
    _check_expressible(cfg)
    classifier = cfg.num_classes > 0
    prefix = "vit." if classifier else ""
    own = model.state_dict()
    out = {src: own[dst] for src, dst in key_table(cfg.depth, prefix).items()}
    for i in range(cfg.depth):
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = own[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)  # rows q; k; v
            out.update({f"{prefix}encoder.layer.{i}.{m}.{kind}": t for m, t in zip(QKV, parts, strict=True)})
    for (src, dst), pre in ((HEAD, ""), (POOLER, prefix)):
        out.update({f"{pre}{src}.{k}": own[f"{dst}.{k}"] for k in ("weight", "bias") if f"{dst}.{k}" in own})
    out = {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}  # q, k, v were views of one tensor
    config, preprocessor = _config_of(model, str(own["cls_token"].dtype)), _preprocessor_of(model.preprocess)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_json(path / CONFIG, config)
    _write_json(path / PREPROCESSOR, preprocessor)


def _check_expressible(cfg: ViTConfig) -> None:
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


def _write_json(file: Path, obj: dict[str, Any]) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")
