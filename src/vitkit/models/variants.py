"""Named variants as data: one size table, one hybrid table, and a parser for the names people type.

Accepted spellings of one model, for example ViT-B/16 at 224 px:
`vit_b16`, `ViT-B/16`, `ViT-B_16` (official file names), `vit_base_patch16_224` (timm); hybrids:
`r50_vit_b16`, `R50+ViT-B/16`, `R50+ViT-B_16`, `vit_base_r50_s16_224` (timm). A `_384` (or `-384`) suffix sets
the image size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ViTConfig


@dataclass(frozen=True)
class Size:
    letter: str  # the paper's letter, "B"
    timm: str  # timm's word, "base"
    width: int
    mlp_dim: int
    heads: int
    depth: int


# Paper Table 1 (Ti and S from DeiT / AugReg, g from "Scaling Vision Transformers").
SIZES = {
    s.letter: s
    for s in (
        Size("Ti", "tiny", 192, 768, 3, 12),
        Size("S", "small", 384, 1536, 6, 12),
        Size("B", "base", 768, 3072, 12, 12),
        Size("L", "large", 1024, 4096, 16, 24),
        Size("H", "huge", 1280, 5120, 16, 32),
    )
}
PATCHES = (8, 14, 16, 32)


@dataclass(frozen=True)
class Hybrid:
    resnet: str  # "R50", "R26" or "R" (root block only)
    size: str
    token_stride: int  # the "/16" of the name: pixels per token
    stages: tuple[int, ...]
    patch_size: int


# The official hybrid configs (google-research/vision_transformer configs, AugReg).
HYBRIDS = {
    h.resnet + "+" + h.size + "/" + str(h.token_stride): h
    for h in (
        Hybrid("R50", "B", 16, (3, 4, 9), 1),
        Hybrid("R50", "L", 32, (3, 4, 6, 3), 1),
        Hybrid("R26", "S", 32, (2, 2, 2, 2), 1),
        Hybrid("R26", "B", 32, (2, 2, 2, 2), 1),
        # Root block only (stride 4) and 8x8 patches on it; AugReg calls it "R+Ti/16", timm `vit_tiny_r_s16_p8`.
        Hybrid("R", "Ti", 16, (), 8),
    )
}

_TIMM_WORD = {s.timm: s.letter for s in SIZES.values()}
_LETTER = {s.letter.lower(): s.letter for s in SIZES.values()}
_RES = r"(?:[_-](?P<res>\d{2,4}))?"
_PATTERNS = (
    # vit_b16, vit_b16_384
    re.compile(r"^vit_(?P<size>ti|s|b|l|h)(?P<patch>\d+)" + _RES + "$", re.I),
    # ViT-B/16, ViT-B_16, ViT-B16
    re.compile(r"^vit-(?P<size>ti|s|b|l|h)[/_]?(?P<patch>\d+)" + _RES + "$", re.I),
    # vit_base_patch16_224
    re.compile(r"^vit_(?P<word>tiny|small|base|large|huge)_patch(?P<patch>\d+)" + _RES + "$", re.I),
)
_HYBRID_PATTERNS = (
    # r50_vit_b16, R50+ViT-B/16, R50+ViT-B_16, R+ViT-Ti/16
    re.compile(r"^(?P<resnet>r\d*)[+_]vit[-_](?P<size>ti|s|b|l|h)[/_]?(?P<stride>\d+)" + _RES + "$", re.I),
    # vit_base_r50_s16_224, vit_tiny_r_s16_p8_224
    re.compile(
        r"^vit_(?P<word>tiny|small|base|large|huge)_(?P<resnet>r\d*)_s(?P<stride>\d+)(?:_p\d+)?" + _RES + "$", re.I
    ),
)


def native_name(cfg_letter: str, patch: int, resnet: str | None = None) -> str:
    base = f"vit_{cfg_letter.lower()}{patch}"
    return base if resnet is None else f"{resnet.lower()}_{base}"


def list_models() -> list[str]:
    """Every named variant in vitkit's own spelling (`vit_b16`, `r50_vit_b16`)."""
    plain = [native_name(s, p) for s in SIZES for p in PATCHES]
    hybrid = [native_name(h.size, h.token_stride, h.resnet) for h in HYBRIDS.values()]
    return plain + hybrid


def config_for(name: str) -> ViTConfig:
    """The config of a named variant, from any accepted spelling.

    Raises:
        ValueError: the name matches no variant; the message lists the known ones.
    """
    text = name.strip()
    for pattern in _HYBRID_PATTERNS:
        m = pattern.match(text)
        if m:
            return _hybrid_config(m, name)
    for pattern in _PATTERNS:
        m = pattern.match(text)
        if m:
            letter = _letter(m)
            patch = int(m["patch"])
            if patch not in PATCHES:
                break
            size = SIZES[letter]
            res = int(m["res"]) if m["res"] else 224
            if res % patch:
                raise ValueError(f"model {name!r}: image size {res} is not divisible by patch size {patch}")
            return ViTConfig(
                img_size=(res, res),
                patch_size=patch,
                width=size.width,
                depth=size.depth,
                heads=size.heads,
                mlp_dim=size.mlp_dim,
                name=native_name(letter, patch),
            )
    raise ValueError(f"unknown model name {name!r}; known: {', '.join(list_models())} (or their aliases)")


def _letter(m: re.Match) -> str:
    groups = m.groupdict()
    if groups.get("word"):
        return _TIMM_WORD[groups["word"].lower()]
    return _LETTER[groups["size"].lower()]


def _hybrid_config(m: re.Match, name: str) -> ViTConfig:
    resnet = m["resnet"].upper()
    letter = _letter(m)
    key = f"{resnet}+{letter}/{m['stride']}"
    if key not in HYBRIDS:
        raise ValueError(f"unknown hybrid {name!r}; known: {', '.join(HYBRIDS)}")
    h = HYBRIDS[key]
    size = SIZES[letter]
    res = int(m["res"]) if m["res"] else 224
    return ViTConfig(
        img_size=(res, res),
        patch_size=h.patch_size,
        width=size.width,
        depth=size.depth,
        heads=size.heads,
        mlp_dim=size.mlp_dim,
        hybrid=h.stages,
        name=native_name(letter, h.token_stride, resnet),
    )


def heads_for_width(width: int) -> int | None:
    """The head count of the named size with this width (for formats that do not store it)."""
    for s in SIZES.values():
        if s.width == width:
            return s.heads
    return None
