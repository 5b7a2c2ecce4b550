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
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import VisionTransformer, ViTConfig
from . import hf_config
from .checkpoint import Checkpoint, require
from .files import read_json, read_safetensors, read_torch

log = logging.getLogger("vitkit")

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
    config, config_file = hf_config.read_config(path)
    # transformers resamples position embeddings bicubic without antialias (interpolate_pos_encoding).
    determined, defaults, classes = {}, {"norm_eps": 1e-12, "gelu": "exact", "pos_antialias": False}, None
    if config:
        determined, defaults, classes = hf_config.from_config(config, config_file, path, sd)
    prep = hf_config.read_preprocess(path)
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


# ---- writing -------------------------------------------------------------------------------------------------
def write(model: VisionTransformer, path: Path) -> None:
    """A directory `transformers.ViTForImageClassification.from_pretrained` loads (`ViTModel` when the model has
    no head): config.json, model.safetensors and preprocessor_config.json.

    Raises:
        ValueError: the model has something transformers' ViT cannot express; the message names the field.
    """
    cfg = model.cfg
    hf_config.check_expressible(cfg)
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
    documents = hf_config.documents(model, str(own["cls_token"].dtype))  # may refuse: before anything is written

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name, document in documents.items():
        (path / name).write_text(json.dumps(document, indent=2) + "\n")
