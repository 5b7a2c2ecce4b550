"""Detect a checkpoint's format, settle the architecture, and build a ready model from it."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..models import VisionTransformer, ViTConfig, resolve_config
from ..models.posembed import resample_pos_embed
from ..models.variants import heads_for_width
from ..preprocess import source_preprocess
from . import hf, jax_npz, mindspore, native, timm, torchvision
from .checkpoint import Checkpoint
from .files import read_safetensors, read_torch
from .infer import infer_config

log = logging.getLogger("vitkit")

# Readers of flat tensor dicts, asked in this order whether the keys are theirs (timm last: others may contain
# timm-like names).
TENSOR_FORMATS = (hf, torchvision, mindspore, timm)
# Fields a name given as `model=` must agree on with the file; the rest (classes, size, pooling...) come from
# the file, or from an explicit override.
ARCHITECTURE = ("width", "depth", "mlp_dim", "patch_size", "heads", "hybrid", "in_chans")
# Fields read off tensor shapes alone (infer.py), which no record in a file can overrule.
SHAPED = {"width", "depth", "mlp_dim", "patch_size", "in_chans", "hybrid", "stem_width", "class_token", "qkv_bias"}
SHAPED |= {"num_classes", "representation_size"}
# The tensor whose shape shows a field, named in the errors about it.
SHOWN_BY = {
    "width": "patch_embed.proj.weight",
    "patch_size": "patch_embed.proj.weight",
    "in_chans": "patch_embed.proj.weight",
    "mlp_dim": "blocks.0.mlp.fc1.weight",
    "num_classes": "head.weight",
    "representation_size": "pre_logits.fc.weight",
}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint into vitkit's names, detecting the format from the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / native.RECORD).exists():
            return native.read(path)
        if (path / "config.json").exists():
            return hf.read(path)
        raise ValueError(
            f"{path}: a directory, but neither a vitkit model ({native.RECORD}) nor a Hugging Face model (config.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return jax_npz.read(path)
    if suffix == ".ckpt" and not zipfile.is_zipfile(path):
        return mindspore.read(path)
    if suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        if "vitkit" in metadata:  # vitkit's weight file alone: the record is in its header
            return native.from_record(tensors, native.header_record(metadata["vitkit"], path), path)
    else:
        tensors = read_torch(path)
    keys = set(tensors)
    for fmt in TENSOR_FORMATS:
        if fmt.matches(keys):
            return fmt.from_tensors(tensors, path)
    raise ValueError(
        f"{path}: unrecognised checkpoint layout; keys such as {sorted(keys)[:8]} match none of "
        "vitkit, timm, Hugging Face, torchvision, MindSpore or the official npz"
    )


def held_by(ckpt: Checkpoint, wanted_img_size: Any = None) -> dict[str, Any]:
    """The config fields the file fixes: read off the shapes, plus what the format stores beside them. A file
    that does not store its image size is taken at the wanted size when its grid fits, else as a square grid."""
    held = infer_config(ckpt.state_dict, ckpt.path, ckpt.determined.get("img_size"), wanted_img_size)
    for key in SHAPED & ckpt.determined.keys():  # what a record says and the tensors show must agree
        if key in held and _norm(held[key]) != _norm(ckpt.determined[key]):
            raise ValueError(
                f"{ckpt.path}: the file's record says {key}={ckpt.determined[key]!r}, but its tensors hold "
                f"{key}={held[key]!r}{_shown(ckpt, key)}"
            )
    held.update(ckpt.determined)
    return held


def resolve(
    ckpt: Checkpoint, held: dict[str, Any], model: str | ViTConfig | None, overrides: dict[str, Any]
) -> ViTConfig:
    """The config to build: the file's architecture, `model=` for what the file leaves open, then overrides."""
    fields = ViTConfig().to_dict() if model is None else resolve_config(model).to_dict()
    if model is not None:
        for key in ARCHITECTURE:
            if key in held and _norm(held[key]) != _norm(fields[key]):
                raise ValueError(
                    f"{ckpt.path}: the file holds {key}={held[key]!r}{_shown(ckpt, key)}, but model {model!r} "
                    f"has {key}={fields[key]!r}"
                )
    fields.update(ckpt.defaults)
    fields.update(held)
    if "heads" not in held and "heads" not in overrides and model is None:
        heads = heads_for_width(fields["width"])
        if heads is None:
            raise ValueError(
                f"{ckpt.path}: the file does not store the number of heads and width "
                f"{fields['width']} is no named size; pass heads=N"
            )
        fields["heads"] = heads
    # Classes and input size may differ (fresh head, resampled position embeddings), and the pre-logits layer
    # may be dropped (as the official fine-tuning does); the file fixes everything else it holds.
    free = {"num_classes", "img_size"}
    for key, value in overrides.items():
        dropping_pre_logits = key == "representation_size" and value is None
        if key in held and key not in free and not dropping_pre_logits and _norm(value) != _norm(held[key]):
            raise ValueError(
                f"{ckpt.path}: the file holds {key}={held[key]!r}{_shown(ckpt, key)}; the override {key}={value!r} "
                "cannot be applied to these weights"
            )
    fields.update(overrides)
    fields["name"] = fields.get("name") or ""
    return ViTConfig.from_dict(fields)


def _shown(ckpt: Checkpoint, key: str) -> str:
    name = SHOWN_BY.get(key)
    if name is None or name not in ckpt.state_dict:
        return ""
    return f" (key {name!r} has shape {tuple(ckpt.state_dict[name].shape)})"


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_state(model: VisionTransformer, ckpt: Checkpoint, held: dict[str, Any]) -> list[str]:
    """Copy the checkpoint's tensors into `model`, resampling position embeddings to the model's grid and
    leaving out a head (or pre-logits layer) the model does not share. Returns what was re-initialised."""
    sd = dict(ckpt.state_dict)
    own = model.state_dict()
    fresh = []
    for prefix in ("head.", "pre_logits."):
        theirs = {k for k in sd if k.startswith(prefix)}
        ours = {k for k in own if k.startswith(prefix)}
        if theirs and (theirs != ours or any(sd[k].shape != own[k].shape for k in theirs)):
            for k in theirs:
                del sd[k]
            fresh += sorted(ours)
        elif ours and not theirs:
            fresh += sorted(ours)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        stride = model.cfg.stride
        old_grid = (held["img_size"][0] // stride, held["img_size"][1] // stride)
        sd["pos_embed"] = resample_pos_embed(
            sd["pos_embed"],
            model.cfg.grid,
            old_grid,
            model.cfg.num_prefix_tokens,
            model.cfg.pos_interp,
            model.cfg.pos_antialias,
        )
        log.info(
            "%s: resampled position embeddings from a %dx%d to a %dx%d grid (%s)",
            ckpt.path,
            *old_grid,
            *model.cfg.grid,
            model.cfg.pos_interp,
        )
    for key, tensor in sd.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(
                f"{ckpt.path}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}"
            )
    missing = sorted(set(own) - set(sd) - set(fresh))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{ckpt.path} ({ckpt.source}): the weights do not fit the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(sd, strict=False)
    if any(k.startswith("head.") for k in fresh):
        # "we remove the pre-trained prediction head and attach a zero-initialized D x K feedforward layer"
        # (paper section 3.2).
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    if fresh:
        log.warning("%s: re-initialised %s (not in the file or a different shape)", ckpt.path, ", ".join(fresh))
    return fresh


def load_pretrained(path: str | Path, model: str | ViTConfig | None = None, **overrides: Any) -> VisionTransformer:
    """Load any supported checkpoint as a ready model in eval mode.

    The architecture comes from the file wherever the file fixes it; `model=` (a name or a ViTConfig) settles
    what it leaves open, and keyword overrides change any ViTConfig field the weights allow: `num_classes=`
    re-initialises the head, `img_size=` resamples the position embeddings, numerics (`norm_eps`, `gelu`) and
    regularisation are free.

    Args:
        path: a file or directory in any supported format (detected from the file).
        model: a variant name or config for what the file does not determine (the head count, for example).
        **overrides: ViTConfig fields.

    Returns:
        The model in eval mode, with `.preprocess` (the source's preprocessing, at the model's input size),
        `.classes` (names, when the file has them) and `.reinitialized` (parameters not taken from the file).
    """
    ckpt = read_checkpoint(path)
    held = held_by(ckpt, overrides.get("img_size"))
    cfg = resolve(ckpt, held, model, overrides)
    net = VisionTransformer(cfg)
    net.reinitialized = load_state(net, ckpt, held)
    prep = ckpt.preprocess or source_preprocess(ckpt.source, cfg.img_size, cfg.in_chans)
    net.preprocess = prep.resized(cfg.img_size)
    if ckpt.classes is not None and cfg.num_classes == len(ckpt.classes):
        net.classes = list(ckpt.classes)
    return net.eval()
