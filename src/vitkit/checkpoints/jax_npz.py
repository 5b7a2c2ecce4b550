"""The JAX checkpoints: google-research/vision_transformer's `.npz` files and big_vision's.

Both are flat `.npz` dicts of '/'-joined Flax parameter paths (REFERENCE.md section 3). What varies between
them is told apart by the keys:

- a prefix: none (released files), `opt/target/` (training checkpoints of the official code, whose Flax
  optimizer state sits beside it under `opt/state/`), `params/` (big_vision, optimizer state under `opt/`);
- the numbering of a block's sub-modules: pre-Linen Flax numbered them in call order across types
  (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`: the released files), Linen per type
  (`LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`: big_vision and newer saves);
- blocks one by one (`Transformer/encoderblock_i/...`) or stacked on a leading depth axis
  (`Transformer/encoderblock/...`, big_vision models built with `nn.scan`);
- the position embedding: the official `Transformer/posembed_input/pos_embedding` is added after the class
  token is prepended, so it has a row for it; big_vision's `pos_embedding` (before 2022 `Transformer/
  pos_embedding`) is added before, so it has none and vitkit gives the class token a zero row (the same sum).
  big_vision models with fixed 2-D sin-cos embeddings store none at all.

Reading is a key table plus the few true special cases (fused qkv, attention output, stacked blocks, old
GroupNorm shapes). Everything below the prefix must be used: a key nobody reads is an error, not a silent drop.
`write` produces the layout of the released files.

Not supported: big_vision's MAP head (refused by name). Its pool_type="0" (the first patch token, no class
token) leaves no trace in the file and reads as average pooling.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import VisionTransformer, ViTConfig
from .checkpoint import Checkpoint, require
from .files import read_npz, to_torch
from .infer import infer_config

log = logging.getLogger("vitkit")


@dataclass(frozen=True)
class Layout:
    """How one array changes between the JAX layout and the PyTorch one, and what it is in the file."""

    to_torch: Callable[[torch.Tensor], torch.Tensor]
    to_jax: Callable[[torch.Tensor], torch.Tensor]
    what: str = "an array"
    ndim: tuple[int, ...] | None = None  # the dimensions it may have in the file; None: any


SAME = Layout(lambda t: t, lambda t: t)
CONV = Layout(lambda t: t.permute(3, 2, 0, 1), lambda t: t.permute(2, 3, 1, 0), "an HWIO conv kernel", (4,))
DENSE = Layout(lambda t: t.T, lambda t: t.T, "an (in, out) dense kernel", (2,))
# GroupNorm scale and bias are (C,); files written before flax fixed GroupNorm's parameter shape store them
# (1, 1, 1, C) (google/flax#1721; the official checkpoint.py squeezes them too).
GROUPNORM = Layout(
    lambda t: t.reshape(t.shape[-1]) if t.ndim == 4 and t.shape[:3] == (1, 1, 1) else t,
    SAME.to_jax,
    "a GroupNorm scale or bias",
    (1, 4),
)

# Outside the prefix, training checkpoints hold optimizer state (flax.optim's `opt/state/...`, big_vision's
# optax `opt/...`) and big_vision its timing record (`chrono/...`): deliberately not read.
TRAINING_STATE = ("opt/", "chrono/")
PREFIXES = ("opt/target/", "params/", "")

# {JAX path below the prefix: (vitkit name, layout)}.
EMBEDDING = {
    "embedding/kernel": ("patch_embed.proj.weight", CONV),
    "embedding/bias": ("patch_embed.proj.bias", SAME),
    "Transformer/encoder_norm/scale": ("norm.weight", SAME),
    "Transformer/encoder_norm/bias": ("norm.bias", SAME),
}
CLASS_TOKEN = {"cls": ("cls_token", SAME)}  # (1, 1, D) both ways
PRE_LOGITS = {  # Dense + tanh, only in the original ImageNet-21k files
    "pre_logits/kernel": ("pre_logits.fc.weight", DENSE),
    "pre_logits/bias": ("pre_logits.fc.bias", SAME),
}
HEAD = {"head/kernel": ("head.weight", DENSE), "head/bias": ("head.bias", SAME)}
POS_OFFICIAL = "Transformer/posembed_input/pos_embedding"  # (1, prefix + N, D)
POS_BIG_VISION = ("pos_embedding", "Transformer/pos_embedding")  # (1, N, D): no class-token row

# Relative to `Transformer/encoderblock_i/` and `blocks.i.`; {ln1}, {attn}, {ln2}, {mlp} come from NUMBERING.
BLOCK = {
    "{ln1}/scale": ("norm1.weight", SAME),
    "{ln1}/bias": ("norm1.bias", SAME),
    "{attn}/out/bias": ("attn.proj.bias", SAME),
    "{ln2}/scale": ("norm2.weight", SAME),
    "{ln2}/bias": ("norm2.bias", SAME),
    "{mlp}/Dense_0/kernel": ("mlp.fc1.weight", DENSE),
    "{mlp}/Dense_0/bias": ("mlp.fc1.bias", SAME),
    "{mlp}/Dense_1/kernel": ("mlp.fc2.weight", DENSE),
    "{mlp}/Dense_1/bias": ("mlp.fc2.bias", SAME),
}
NUMBERING = {
    "pre-linen": {
        "ln1": "LayerNorm_0",
        "attn": "MultiHeadDotProductAttention_1",
        "ln2": "LayerNorm_2",
        "mlp": "MlpBlock_3",
    },
    "linen": {
        "ln1": "LayerNorm_0",
        "attn": "MultiHeadDotProductAttention_0",
        "ln2": "LayerNorm_1",
        "mlp": "MlpBlock_0",
    },
}
_PRE_LINEN = re.compile(r"Transformer/encoderblock(_\d+)?/(MultiHeadDotProductAttention_1|LayerNorm_2|MlpBlock_3)/")

# The hybrid's ResNet stem (official models_resnet.py names -> timm's ResNetV2 names under patch_embed.backbone).
ROOT = {
    "conv_root/kernel": ("stem.conv.weight", CONV),
    "gn_root/scale": ("stem.norm.weight", GROUPNORM),
    "gn_root/bias": ("stem.norm.bias", GROUPNORM),
}
UNIT = {  # relative to `block{s}/unit{u}/` and `stages.{s-1}.blocks.{u-1}.`
    **{f"conv{r}/kernel": (f"conv{r}.weight", CONV) for r in (1, 2, 3)},
    **{
        f"gn{r}/{p}": (f"norm{r}.{q}", GROUPNORM) for r in (1, 2, 3) for p, q in (("scale", "weight"), ("bias", "bias"))
    },
}
PROJECTION = {  # the shortcut of every stage's first unit
    "conv_proj/kernel": ("downsample.conv.weight", CONV),
    "gn_proj/scale": ("downsample.norm.weight", GROUPNORM),
    "gn_proj/bias": ("downsample.norm.bias", GROUPNORM),
}
BACKBONE = "patch_embed.backbone."


@dataclass(frozen=True)
class Structure:
    """What a file holds beyond the shapes: which optional parts, and how the blocks are named."""

    depth: int
    numbering: str = "pre-linen"
    hybrid: tuple[int, ...] | None = None
    class_token: bool = True
    pre_logits: bool = False
    head: bool = True


def entries(st: Structure) -> Iterator[tuple[str, str, Layout]]:
    """(JAX path, vitkit name, layout) of every one-to-one array; attention and position embedding apart."""
    yield from _rows(EMBEDDING)
    for present, table in ((st.class_token, CLASS_TOKEN), (st.pre_logits, PRE_LOGITS), (st.head, HEAD)):
        if present:
            yield from _rows(table)
    names = NUMBERING[st.numbering]
    for i in range(st.depth):
        for path, (name, layout) in BLOCK.items():
            yield f"Transformer/encoderblock_{i}/{path.format(**names)}", f"blocks.{i}.{name}", layout
    if st.hybrid is None:
        return
    yield from _rows(ROOT, BACKBONE)
    for s, units in enumerate(st.hybrid):
        for u in range(units):
            unit, block = f"block{s + 1}/unit{u + 1}/", f"{BACKBONE}stages.{s}.blocks.{u}."
            yield from _rows({**UNIT, **(PROJECTION if u == 0 else {})}, block, unit)


def _rows(table: dict[str, tuple[str, Layout]], name_prefix: str = "", path_prefix: str = "") -> Iterator:
    for path, (name, layout) in table.items():
        yield path_prefix + path, name_prefix + name, layout


QKV = ("query", "key", "value")


def attention_paths(i: int, numbering: str) -> dict[str, str]:
    """JAX paths of block i's query/key/value/out kernels and biases (the fused-qkv special case)."""
    base = f"Transformer/encoderblock_{i}/{NUMBERING[numbering]['attn']}/"
    return {f"{n}/{p}": f"{base}{n}/{p}" for n in (*QKV, "out") for p in ("kernel", "bias")}


# ---- reading ---------------------------------------------------------------------------------------------------
class _Arrays:
    """The file's arrays below one prefix, handed out as float32 tensors. Remembers what was taken, so that what
    is left over can be named, and reads stacked blocks (`encoderblock/...`, leading depth axis) as if they were
    stored one by one."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str, path: str, depth: int | None):
        self.arrays, self.prefix, self.path = arrays, prefix, path
        self.stacked_depth = depth  # None: blocks stored one by one
        self.taken: set[str] = set()

    def _locate(self, key: str) -> tuple[str, int | None]:
        m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", key)
        if self.stacked_depth is not None and m:
            return f"{self.prefix}Transformer/encoderblock/{m[2]}", int(m[1])
        return self.prefix + key, None

    def has(self, key: str) -> bool:
        return self._locate(key)[0] in self.arrays

    def name(self, key: str) -> str:
        """The key as the file spells it; `[i]` marks block i of a stacked array."""
        full, index = self._locate(key)
        return full if index is None else f"{full}[{index}]"

    def describe(self, key: str, tensor: torch.Tensor) -> str:
        return f"{self.name(key)} {tuple(tensor.shape)}"

    def take(self, key: str) -> torch.Tensor:
        full, index = self._locate(key)
        array = require(self.arrays, full, self.path)
        self.taken.add(full)
        if index is None:
            return to_torch(array)
        if array.ndim == 0 or array.shape[0] != self.stacked_depth:
            raise ValueError(
                f"{self.path}: stacked key {full!r} has shape {array.shape}; expected a leading depth axis of "
                f"{self.stacked_depth}"
            )
        return to_torch(array[index])

    def leftover(self) -> list[str]:
        """Keys nothing read, training state outside the prefix excepted."""
        return sorted(
            k
            for k in self.arrays
            if k not in self.taken and (k.startswith(self.prefix) or not k.startswith(TRAINING_STATE))
        )


def read(path: Path) -> Checkpoint:
    """An official or big_vision `.npz` file as a Checkpoint (float32 tensors under vitkit's names)."""
    return from_arrays(read_npz(path), path)


def from_arrays(arrays: dict[str, np.ndarray], path: Path | str) -> Checkpoint:
    """The Checkpoint of a dict of arrays as an `.npz` file holds them."""
    path = str(path)
    prefix = next((p for p in PREFIXES if p + "embedding/kernel" in arrays), None)
    if prefix is None:
        raise ValueError(
            f"{path}: no patch embedding `embedding/kernel` (nor under `opt/target/` or `params/`); not an official "
            f"or big_vision ViT file (keys such as {sorted(arrays)[:6]})"
        )
    keys = [k[len(prefix) :] for k in arrays if k.startswith(prefix)]
    if any(k.startswith("MAPHead_") or k == "probe" for k in keys):
        raise ValueError(
            f"{path}: a big_vision model with a MAP head (pool_type='map', keys `MAPHead_0/...`) is not supported; "
            "vitkit pools with the class token or the token average"
        )
    numbering = "pre-linen" if any(_PRE_LINEN.match(k) for k in keys) else "linen"
    stacked_key = f"{prefix}Transformer/encoderblock/{NUMBERING['linen']['ln1']}/scale"
    stacked_depth = arrays[stacked_key].shape[0] if stacked_key in arrays and arrays[stacked_key].ndim else None
    src = _Arrays(arrays, prefix, path, stacked_depth)
    blocks = {int(m[1]) for k in keys if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    depth = stacked_depth if stacked_depth is not None else max(blocks, default=-1) + 1
    if depth == 0:
        raise ValueError(f"{path}: no transformer blocks (`{prefix}Transformer/encoderblock_0/...`) found")
    st = Structure(
        depth=depth,
        numbering=numbering,
        hybrid=_stem_depths(keys) if src.has("conv_root/kernel") else None,
        class_token=src.has("cls"),
        pre_logits=src.has("pre_logits/kernel"),
        head=src.has("head/kernel"),
    )

    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, list[str]] = {}  # vitkit name -> the file's keys it came from, for error messages
    for key, name, layout in entries(st):
        tensor = src.take(key)
        if layout.ndim is not None and tensor.ndim not in layout.ndim:
            raise ValueError(
                f"{path}: key {src.name(key)!r} has shape {tuple(tensor.shape)}; expected {layout.what} "
                f"({' or '.join(map(str, layout.ndim))} dimensions)"
            )
        sd[name], origin[name] = layout.to_torch(tensor), [src.describe(key, tensor)]
    first = None  # block 0's query kernel, (D, heads, head_dim): every block must agree with it
    for i in range(depth):
        paths = attention_paths(i, numbering)
        tensors = {part: src.take(key) for part, key in paths.items()}
        named = {part: src.name(key) for part, key in paths.items()}
        first = first or (named["query/kernel"], tuple(tensors["query/kernel"].shape))
        for name, tensor in _attention_to_torch(tensors, named, first, path).items():
            sd[f"blocks.{i}.{name}"] = tensor
            origin[f"blocks.{i}.{name}"] = [src.describe(paths[p], tensors[p]) for p in _ATTENTION_SOURCES[name]]
    heads = first[1][1]
    pos, big_vision_pos = _read_pos_embed(src, st, path)
    if pos is not None:
        sd["pos_embed"], origin["pos_embed"] = pos
    unused = src.leftover()
    if unused:
        raise ValueError(
            f"{path}: {len(unused)} key(s) that an official/big_vision ViT does not have: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}"
        )
    _check_shapes(sd, origin, heads, path)
    big_vision = prefix == "params/" or stacked_depth is not None or big_vision_pos
    source = "big_vision" if big_vision else "official-npz"
    # JAX's nn.gelu is the tanh approximation; flax LayerNorm and GroupNorm use eps 1e-6.
    # JAX's nn.gelu is the tanh approximation; both codebases resize position embeddings with
    # scipy.ndimage.zoom(order=1), i.e. bilinear with aligned corners.
    defaults = {"norm_eps": 1e-6, "gelu": "tanh", "stem_numerics": "official", "pos_interp": "bilinear"}
    return Checkpoint(sd, source, path, determined={"heads": heads}, defaults=defaults)


def _stem_depths(keys: list[str]) -> tuple[int, ...]:
    """Units per stage from `block{s}/unit{u}/` keys (1-based in the file); () for the root block alone."""
    units: dict[int, int] = {}
    for k in keys:
        if m := re.match(r"block(\d+)/unit(\d+)/", k):
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]))
    # A missing stage or unit in between shows up as a missing key when its parameters are read.
    return tuple(units.get(s, 1) for s in range(1, max(units, default=0) + 1))


# vitkit name -> the attention parts it is made of (the keys named when its shape is wrong).
_ATTENTION_SOURCES = {
    "attn.qkv.weight": ("query/kernel", "key/kernel", "value/kernel"),
    "attn.qkv.bias": ("query/bias", "key/bias", "value/bias"),
    "attn.proj.weight": ("out/kernel",),
}


def _attention_to_torch(
    t: dict[str, torch.Tensor], named: dict[str, str], first: tuple[str, tuple[int, ...]], path: str
) -> dict[str, torch.Tensor]:
    """Flax's separate query/key/value DenseGeneral kernels (D, heads, head_dim) -> one fused qkv Linear (rows q;
    k; v), and the output kernel (heads, head_dim, D) -> a (D, heads * head_dim) Linear weight.

    `first` is (name, shape) of block 0's query kernel; the head count is read from it, so every attention
    array is held to it (a reshape alone would accept another split of the same width).
    """
    if len(first[1]) != 3:
        raise ValueError(f"{path}: key {first[0]!r} has shape {first[1]}; expected (width, heads, head_dim)")
    width, heads, head_dim = first[1]
    expected = {
        **{f"{n}/kernel": (width, heads, head_dim) for n in QKV},
        **{f"{n}/bias": (heads, head_dim) for n in QKV},
        "out/kernel": (heads, head_dim, width),
    }
    for part, shape in expected.items():
        if tuple(t[part].shape) != shape:
            raise ValueError(
                f"{path}: key {named[part]!r} has shape {tuple(t[part].shape)}; expected {shape} (width {width}, "
                f"{heads} heads of {head_dim} from {first[0]!r} {first[1]})"
            )
    return {
        "attn.qkv.weight": torch.cat([t[f"{n}/kernel"].reshape(width, -1).T for n in QKV]),  # (3D, D)
        "attn.qkv.bias": torch.cat([t[f"{n}/bias"].reshape(-1) for n in QKV]),
        "attn.proj.weight": t["out/kernel"].reshape(-1, width).T,
    }


def _read_pos_embed(src: _Arrays, st: Structure, path: str) -> tuple[tuple[torch.Tensor, list[str]] | None, bool]:
    """((1, prefix + N, D) embeddings and their key, or None for fixed sin-cos), and whether big_vision's."""
    big_vision = not src.has(POS_OFFICIAL) and st.numbering == "linen"
    key = next((k for k in POS_BIG_VISION if src.has(k)), None) if big_vision else POS_OFFICIAL
    if key is None:
        return None, True  # big_vision's posemb="sincos2d": fixed, nothing stored
    pos = src.take(key)
    rows = pos.shape[1] if pos.ndim == 3 and pos.shape[0] == 1 else -1
    # The official model adds them after prepending the class token, so they have its row; big_vision adds them
    # before, but its code before 2022 did not (big_vision's fix_old_checkpoints tells the two apart the same
    # way: N + 1 rows with N square).
    token_row = st.class_token and (not big_vision or _is_square(rows - 1))
    if rows - token_row < 1 or not _is_square(rows - token_row):
        raise ValueError(
            f"{path}: key {src.name(key)!r} has shape {tuple(pos.shape)}; expected (1, {'1 + ' if token_row else ''}"
            "N, width) with N the positions of a square grid, as these files store them"
        )
    origin = [src.describe(key, pos)]
    if st.class_token and not token_row:
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)  # a zero row: the same sum
    return (pos, origin), big_vision


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _check_shapes(sd: dict[str, torch.Tensor], origin: dict[str, list[str]], heads: int, path: str) -> None:
    """Every tensor against the model the file describes (built on the meta device: no memory, no arithmetic),
    naming the file's keys, so that a wrong shape is reported here and not as a vitkit name later."""
    fields = {**infer_config(sd, path), "heads": heads}
    try:
        cfg = ViTConfig(**fields)
    except ValueError as e:
        anchors = origin["patch_embed.proj.weight"] + origin["blocks.0.attn.qkv.weight"][:1]
        raise ValueError(f"{path}: the arrays do not describe a consistent ViT ({e}; read from {anchors})") from e
    with torch.device("meta"):
        expected = VisionTransformer(cfg).state_dict()
    wrong = [
        f"{' + '.join(origin[k])} gives {k} {tuple(t.shape)}, expected {tuple(expected[k].shape)}"
        for k, t in sd.items()
        if k in expected and t.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} array(s) have shapes that do not fit the rest of the file (width "
            f"{cfg.width}, mlp {cfg.mlp_dim}, heads {heads}): "
            + "; ".join(wrong[:6])
            + (" ..." if len(wrong) > 6 else "")
        )


# ---- writing ---------------------------------------------------------------------------------------------------
def write(model: VisionTransformer, path: Path) -> None:
    """`model` in the layout of the released official files (float32, pre-Linen names, no prefix).

    Raises:
        ValueError: the model has something the layout cannot express (names the ViTConfig field).
    """
    cfg = model.cfg
    _check_writable(cfg, path)
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    st = Structure(
        depth=cfg.depth,
        hybrid=cfg.hybrid,
        class_token=cfg.class_token,
        pre_logits=bool(cfg.representation_size),
        head=bool(cfg.num_classes),
    )
    arrays = {key: layout.to_jax(sd[name]) for key, name, layout in entries(st)}
    arrays[POS_OFFICIAL] = sd["pos_embed"]
    hd = cfg.width // cfg.heads
    for i in range(cfg.depth):
        paths = attention_paths(i, st.numbering)
        kernels = sd[f"blocks.{i}.attn.qkv.weight"].T.reshape(cfg.width, 3, cfg.heads, hd)  # (D, q;k;v, h, d)
        biases = sd[f"blocks.{i}.attn.qkv.bias"].reshape(3, cfg.heads, hd)
        for j, n in enumerate(QKV):
            arrays[paths[f"{n}/kernel"]] = kernels[:, j]
            arrays[paths[f"{n}/bias"]] = biases[j]
        arrays[paths["out/kernel"]] = sd[f"blocks.{i}.attn.proj.weight"].T.reshape(cfg.heads, hd, cfg.width)
        arrays[paths["out/bias"]] = sd[f"blocks.{i}.attn.proj.bias"]
    _warn_numerics(cfg, path)
    # A file object, so that numpy does not append `.npz` to a path that lacks it.
    with open(path, "wb") as f:
        np.savez(f, **{key: t.contiguous().numpy() for key, t in arrays.items()})


def _check_writable(cfg: ViTConfig, path: Path) -> None:
    problems = []
    if cfg.pos_embed != "learn":
        problems.append(f"ViTConfig.pos_embed={cfg.pos_embed!r}: the layout stores learned position embeddings only")
    if cfg.pool == "gap" and cfg.fc_norm:
        problems.append("ViTConfig.fc_norm=True: the official code applies the final LayerNorm before pooling")
    if cfg.pool == "gap" and cfg.class_token:
        problems.append("ViTConfig.class_token=True with pool='gap': a file with `cls` reads back as token pooling")
    if not cfg.qkv_bias:
        problems.append("ViTConfig.qkv_bias=False: the official attention has query/key/value biases")
    if cfg.grid[0] != cfg.grid[1]:
        problems.append(
            f"ViTConfig.img_size={cfg.img_size}: the layout stores a square grid of position embeddings "
            f"(this one is {cfg.grid[0]}x{cfg.grid[1]})"
        )
    if problems:
        raise ValueError(f"{path}: cannot write this model in the official npz layout: " + "; ".join(problems))


def _warn_numerics(cfg: ViTConfig, path: Path) -> None:
    """The file cannot record numerics; readers assume the official ones. The weights are still right."""
    official = {"gelu": "tanh", "norm_eps": 1e-6}
    if cfg.hybrid is not None:
        official["stem_numerics"] = "official"
    differ = {k: getattr(cfg, k) for k, v in official.items() if getattr(cfg, k) != v}
    if differ:
        log.warning(
            "%s: the npz layout does not record numerics; it will load with %s, the model has %s "
            "(pass those as overrides when loading to keep them)",
            path,
            {k: official[k] for k in differ},
            differ,
        )
