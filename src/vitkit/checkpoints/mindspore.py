"""MindSpore ViT checkpoints, read without MindSpore: `.ckpt` protobuf files and MindSpore names in torch files.

A `.ckpt` is one protobuf message (mindspore/ccsrc/utils/checkpoint.proto, proto2):

    message Checkpoint {
      message Value { required string tag = 1; oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
      repeated Value value = 1;
    }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

`tensor_content` is the raw little-endian buffer; MindSpore cuts large tensors into consecutive Values with one tag
(concatenate the bytes) and writes a scalar as dims [0]. A small wire-format decoder below reads it.

Three namings are placed (REFERENCE.md section 3; sources named in `vitkit_name`):
- mindcv's current `VisionTransformer`: timm's names with MindSpore LayerNorm `gamma`/`beta` (or, once mindcv
  moved to `mint` layers, `weight`/`bias` as in timm);
- mindvision and the MindSpore ViT tutorial: `cls`, `pos_embedding`, `patch_embedding.conv`,
  `transformer.layers.{i}.{0,1}.cell.{0,1}.*`, `norm`, head `dense` (or `head.dense`);
- mindcv's first ViT: the same names under `backbone.`, head `head.classifier` (with pre-logits:
  `head.classifier.0.classifier` + tanh, then `head.classifier.1.classifier`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint

# ---- name tables -------------------------------------------------------------------------------------------------
# Whole-model keys (after an optional `backbone.` prefix is dropped), MindSpore name -> vitkit name.
KEYS = {
    # mindcv (timm-like)
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "norm.gamma": "norm.weight",
    "norm.beta": "norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "fc_norm.gamma": "fc_norm.weight",
    "fc_norm.beta": "fc_norm.bias",
    "fc_norm.weight": "fc_norm.weight",
    "fc_norm.bias": "fc_norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
    # mindvision / tutorial: the class token Parameter is created with name="cls", which a top-level cell keeps;
    # mindcv's first ViT nests it under `backbone` and then MindSpore renames it to the attribute, `cls_token`.
    "cls": "cls_token",
    "pos_embedding": "pos_embed",
    "patch_embedding.conv.weight": "patch_embed.proj.weight",
    "patch_embedding.conv.bias": "patch_embed.proj.bias",
    "dense.weight": "head.weight",
    "dense.bias": "head.bias",
    "head.dense.weight": "head.weight",
    "head.dense.bias": "head.bias",
    # mindcv's first ViT: DenseHead(classifier=Dense), or MultilayerDenseHead([Dense + tanh, Dense]).
    "head.classifier.weight": "head.weight",
    "head.classifier.bias": "head.bias",
    "head.classifier.0.classifier.weight": "pre_logits.fc.weight",
    "head.classifier.0.classifier.bias": "pre_logits.fc.bias",
    "head.classifier.1.classifier.weight": "head.weight",
    "head.classifier.1.classifier.bias": "head.bias",
}

# mindcv blocks `blocks.{i}.<suffix>` -> `blocks.{i}.<vitkit suffix>`.
MINDCV_BLOCK = {
    "norm1.gamma": "norm1.weight",
    "norm1.beta": "norm1.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",  # (3D, D), rows q; k; v (reshaped (B, N, 3, heads, d) as timm)
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.gamma": "norm2.weight",
    "norm2.beta": "norm2.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}

# mindvision blocks `transformer.layers.{i}.<suffix>`: each layer is SequentialCell([ResidualCell(Sequential([norm,
# attention])), ResidualCell(Sequential([norm, feedforward]))]), so `0.cell.*` is attention and `1.cell.*` the MLP.
MINDVISION_BLOCK = {
    "0.cell.0.gamma": "norm1.weight",
    "0.cell.0.beta": "norm1.bias",
    "0.cell.1.qkv.weight": "attn.qkv.weight",
    "0.cell.1.qkv.bias": "attn.qkv.bias",
    "0.cell.1.out.weight": "attn.proj.weight",
    "0.cell.1.out.bias": "attn.proj.bias",
    "1.cell.0.gamma": "norm2.weight",
    "1.cell.0.beta": "norm2.bias",
    "1.cell.1.dense1.weight": "mlp.fc1.weight",
    "1.cell.1.dense1.bias": "mlp.fc1.bias",
    "1.cell.1.dense2.weight": "mlp.fc2.weight",
    "1.cell.1.dense2.bias": "mlp.fc2.bias",
}

_MINDCV = re.compile(r"blocks\.(\d+)\.(.+)")
_MINDVISION = re.compile(r"transformer\.layers\.(\d+)\.(.+)")

# Training state that training checkpoints carry beside the weights and that is deliberately dropped: optimizer
# slots are stored as `<slot>.<parameter name>` (Momentum `moments`, Adam `moment1`/`moment2`, AdamWeightDecay and
# mindcv's AdamW `adam_m`/`adam_v`, LAMB `lamb_m`/`lamb_v`, RMSProp `mean_grad`/`mean_square`/`moment`, Adagrad
# `accum`), gradient accumulation `accu_grads.*`, mindcv's EMA copy `ema.*`. Scalars (global_step, learning_rate,
# beta1_power, loss scale, epoch_num, ...) are dropped by rank: no ViT weight is a scalar.
TRAINING_STATE_PREFIXES = frozenset(
    {
        "moments",
        "moment1",
        "moment2",
        "adam_m",
        "adam_v",
        "lamb_m",
        "lamb_v",
        "mean_grad",
        "mean_square",
        "moment",
        "accum",
        "accu_grads",
        "ema",
    }
)
TRAINING_STATE_KEYS = frozenset(
    {
        "global_step",
        "learning_rate",
        "momentum",
        "beta1_power",
        "beta2_power",
        "scale_sense",
        "loss_scale",
        "current_iterator_step",
        "last_overflow_iterator_step",
        "epoch_num",
        "step_num",
    }
)

# MindSpore's numerics follow from the layer classes, which the LayerNorm names reveal: `nn.LayerNorm` stores
# gamma/beta with epsilon 1e-7 and mindcv pairs it with `nn.GELU` (approximate=True: tanh); mindcv's `mint`
# layers store weight/bias, `mint.nn.LayerNorm` eps 1e-5 with `mint.nn.GELU` (approximate='none': exact).
NN_NUMERICS = {"norm_eps": 1e-7, "gelu": "tanh"}
MINT_NUMERICS = {"norm_eps": 1e-5, "gelu": "exact"}


def matches(keys: set[str]) -> bool:
    """MindSpore names in a torch or safetensors file: the LayerNorm `gamma` of mindcv or mindvision blocks."""
    keys = {k.removeprefix("backbone.") for k in keys}
    mindcv = "patch_embed.proj.weight" in keys and "blocks.0.norm1.gamma" in keys
    mindvision = "patch_embedding.conv.weight" in keys and "transformer.layers.0.0.cell.0.gamma" in keys
    return mindcv or mindvision


def from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    """MindSpore-named tensors (from a .ckpt or a torch/safetensors file) -> vitkit names, float32."""
    sd: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown = []
    for key, value in tensors.items():
        if is_training_state(key, value.ndim == 0):
            continue
        name = vitkit_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name in sd:
            raise ValueError(f"{path}: both {sources[name]!r} and {key!r} map to vitkit's {name!r}")
        sources[name] = key
        sd[name] = value.float() if value.is_floating_point() else value
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} MindSpore weight(s) that vitkit cannot place (not training state either): "
            f"{sorted(unknown)[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    if not sd:
        raise ValueError(f"{path}: no model weights, only training state ({sorted(tensors)[:5]} ...)")
    gamma_beta = any(src.endswith((".gamma", ".beta")) for src in sources.values())
    defaults = dict(NN_NUMERICS if gamma_beta else MINT_NUMERICS)
    return Checkpoint(sd, "mindspore", str(path), defaults=defaults)


def read(path: Path) -> Checkpoint:
    """A MindSpore `.ckpt` file."""
    return from_tensors(read_ckpt(path), path)


def vitkit_name(key: str) -> str | None:
    """The vitkit name of a MindSpore key, or None for a key outside the tables.

    Sources: mindcv `mindcv/models/vit.py` (current, and the first version with `BaseClassifier`), the MindSpore
    ViT tutorial (`tutorials/source_en/cv/vit.md`), and mindcv's conversion of mindvision files, which maps
    `cls` and `dense.*` / `head.dense.*` onto its own names.
    """
    key = key.removeprefix("backbone.")
    if key in KEYS:
        return KEYS[key]
    if (m := _MINDCV.fullmatch(key)) and m[2] in MINDCV_BLOCK:
        return f"blocks.{m[1]}.{MINDCV_BLOCK[m[2]]}"
    if (m := _MINDVISION.fullmatch(key)) and m[2] in MINDVISION_BLOCK:
        return f"blocks.{m[1]}.{MINDVISION_BLOCK[m[2]]}"
    return None


def is_training_state(key: str, scalar: bool) -> bool:
    return scalar or key in TRAINING_STATE_KEYS or key.split(".", 1)[0] in TRAINING_STATE_PREFIXES


# ---- the .ckpt container -----------------------------------------------------------------------------------------
# tensor_type -> little-endian numpy dtype (MindSpore's `tensor_to_np_type`; older releases spelled "Uint8").
DTYPES = {
    "Float16": "<f2",
    "Float32": "<f4",
    "Float64": "<f8",
    "BFloat16": "<u2",  # upper half of a float32, widened in `_decode`
    "Int8": "i1",
    "UInt8": "u1",
    "Uint8": "u1",
    "Int16": "<i2",
    "UInt16": "<u2",
    "Uint16": "<u2",
    "Int32": "<i4",
    "UInt32": "<u4",
    "Uint32": "<u4",
    "Int64": "<i8",
    "UInt64": "<u8",
    "Uint64": "<u8",
    "Bool": "?",
}


@dataclass
class Entry:
    """One tensor of a .ckpt: its Values' parts concatenated."""

    tag: str
    dims: list[int]
    dtype: str
    parts: list[memoryview] = field(default_factory=list)
    map_tensor: bool = False

    @property
    def scalar(self) -> bool:
        return self.dims in ([], [0])  # MindSpore writes a scalar as dims [0]


class WireError(ValueError):
    """Malformed protobuf bytes; `parse_entries` adds the file and the entry.

    `partial` holds what is left of a length-delimited field that runs past the end of its message, so that the
    tag of a cut-off entry can still be named.
    """

    def __init__(self, message: str, partial: memoryview | None = None):
        super().__init__(message)
        self.partial = partial


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a .ckpt by tag, decoded to torch (floats as float32). Training state and string
    metadata are left out; the bytes of every numeric entry, training state included, are checked against its
    dims."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    out = {}
    for e in parse_entries(data, path):
        if e.dtype == "str":  # string metadata (MindSpore's append_dict), never a weight
            continue
        known = not e.map_tensor and e.dtype in DTYPES
        if is_training_state(e.tag, e.scalar):
            if known:
                _check_size(e, path)
            continue
        if not known:
            what = "a MapTensor" if e.map_tensor else f"of tensor_type {e.dtype!r}"
            raise ValueError(f"{path}: entry {e.tag!r} is {what}, which vitkit cannot read as a ViT weight")
        out[e.tag] = _decode(e, path)
    return out


def parse_entries(data: memoryview, path: Path) -> list[Entry]:
    """The Values of a Checkpoint message, consecutive parts of one tag merged."""
    entries: list[Entry] = []
    seen: set[str] = set()
    prev = None
    try:
        for number, wire, value in wire_fields(data):
            if number != 1:
                continue  # fields later MindSpore releases may add; Values are all vitkit needs
            if wire != 2:
                raise WireError(f"Checkpoint.value has wire type {wire}, not length-delimited")
            try:
                tag, dims, dtype, content, map_tensor = _value(value)
            except WireError as e:  # inside a complete Value: nothing was cut off, so no tag to peek at
                raise WireError(str(e)) from e
            if entries and entries[-1].tag == tag:
                last = entries[-1]
                if dtype != last.dtype:
                    raise WireError(f"parts of {tag!r} disagree on tensor_type ({last.dtype} vs {dtype})")
                last.dims = dims  # as MindSpore: the shape of the last part
                last.parts.append(content)
            else:
                if tag in seen:
                    raise WireError(f"tag {tag!r} appears twice, apart")
                seen.add(tag)
                entries.append(Entry(tag, dims, dtype, [content], map_tensor))
            prev = tag
    except WireError as e:
        cut = _peek_tag(e.partial)
        if cut is not None:
            where = f"in entry {cut!r}"
        else:
            where = f"after entry {prev!r}" if prev is not None else "at the start"
        raise ValueError(f"{path}: not a readable MindSpore checkpoint (truncated or corrupt?) {where}: {e}") from e
    if not entries:
        raise ValueError(f"{path}: not a MindSpore checkpoint: no tensors found")
    return entries


def _peek_tag(partial: memoryview | None) -> str | None:
    """The tag at the start of a cut-off Value, if that much survived (MindSpore writes the tag first)."""
    if partial is None:
        return None
    try:
        number, wire, value = next(wire_fields(partial))
        return _text(value, "tag") if number == 1 and wire == 2 else None
    except (WireError, StopIteration):
        return None


def _value(buf: memoryview) -> tuple[str, list[int], str, memoryview, bool]:
    """Checkpoint.Value -> (tag, dims, tensor_type, tensor_content, is_map_tensor)."""
    tag, tensor, map_tensor = None, None, False
    for number, wire, value in wire_fields(buf):
        if number == 1 and wire == 2:
            tag = _text(value, "tag")
        elif number == 2 and wire == 2:
            tensor = value
        elif number == 3 and wire == 2:
            map_tensor = True
    if tag is None:
        raise WireError("a Value without a tag")
    if map_tensor and tensor is None:
        return tag, [], "", memoryview(b""), True
    if tensor is None:
        raise WireError(f"Value {tag!r} has no tensor")
    dims: list[int] = []
    dtype, content = None, None
    try:
        for number, wire, value in wire_fields(tensor):
            if number == 1 and wire == 0:  # unpacked repeated int64 (proto2's default)
                dims.append(_int64(value))
            elif number == 1 and wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    d, pos = read_varint(value, pos)
                    dims.append(_int64(d))
            elif number == 2 and wire == 2:
                dtype = _text(value, "tensor_type")
            elif number == 3 and wire == 2:
                content = value
    except WireError as e:
        raise WireError(f"{e} in the tensor of {tag!r}") from e
    if dtype is None or content is None:
        raise WireError(f"the tensor of {tag!r} lacks its {'tensor_type' if dtype is None else 'tensor_content'}")
    if any(d < 0 for d in dims):
        raise WireError(f"{tag!r} has negative dims {dims}")
    return tag, dims, dtype, content, False


def _check_size(e: Entry, path: Path) -> int:
    """The element count of `e`, after checking that its bytes are exactly dims x dtype."""
    itemsize = np.dtype(DTYPES[e.dtype]).itemsize
    numel = 1 if e.scalar else math.prod(e.dims)
    size = sum(len(p) for p in e.parts)
    if size != numel * itemsize:
        raise ValueError(
            f"{path}: entry {e.tag!r} holds {size} bytes, but dims {e.dims} of {e.dtype} need {numel * itemsize} "
            "(truncated or corrupt?)"
        )
    return numel


def _decode(e: Entry, path: Path) -> torch.Tensor:
    _check_size(e, path)
    raw = e.parts[0] if len(e.parts) == 1 else b"".join(e.parts)
    array = np.frombuffer(raw, dtype=DTYPES[e.dtype])
    if e.dtype == "BFloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    shape = () if e.scalar else tuple(e.dims)
    t = torch.from_numpy(array.reshape(shape).copy())  # copy: own the memory, native byte order
    return t.float() if t.is_floating_point() else t


# ---- protobuf wire format ----------------------------------------------------------------------------------------
def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("data ends inside a varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("a varint longer than 10 bytes")


def wire_fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) for each field of a message: an int for varints, a memoryview of the
    bytes for the others. Groups (wire types 3, 4) and the undefined types 6, 7 are errors."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            if n > end - pos:
                raise WireError(f"field {number} needs {n} bytes, only {end - pos} remain", buf[pos:end])
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if n > end - pos:
                raise WireError(f"field {number} needs {n} bytes, only {end - pos} remain")
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise WireError(f"field {number} has wire type {wire}")
        yield number, wire, value


def _int64(value: int) -> int:
    """A varint read as a two's-complement int64 (negative values take 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"{what} is not UTF-8") from e
