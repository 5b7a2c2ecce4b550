"""The one typed config that describes every ViT vitkit builds (plain and hybrid)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

Pool = Literal["token", "gap"]
Gelu = Literal["exact", "tanh"]
PosEmbed = Literal["learn", "sincos"]
Interp = Literal["bicubic", "bilinear"]
StemNumerics = Literal["official", "timm"]


# Field -> the least value it may take (checked with the types in ViTConfig.__post_init__).
_INTS = {
    "patch_size": 1,
    "in_chans": 1,
    "num_classes": 0,
    "width": 1,
    "depth": 1,
    "heads": 1,
    "mlp_dim": 1,
    "representation_size": 1,
    "stem_width": 1,
}
# A sanity bound that keeps a damaged or hostile file from making vitkit allocate without end: a 16,384-pixel
# square at patch 16 is 2^20 tokens, whose attention matrix alone would need 4 TB per head.
MAX_TOKENS = 2**20
_RATES = ("dropout", "attn_dropout", "drop_path")
_BOOLS = ("class_token", "fc_norm", "qkv_bias", "dynamic_img_size", "pos_antialias")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def stem_stride(hybrid: tuple[int, ...] | None) -> int:
    """Total stride of a hybrid stem: root conv + max-pool = 4, each stage after the first 2 more; 1 for none."""
    if hybrid is None:
        return 1
    return 4 * 2 ** max(len(hybrid) - 1, 0)


@dataclass
class ViTConfig:
    """Architecture of a Vision Transformer (paper section 3.1) and the numerics of the source it came from.

    Attributes:
        img_size: (height, width) the position embeddings are built for.
        patch_size: side of a square patch in pixels; for hybrids, in stem feature-map cells (1 in the paper).
        in_chans: input channels.
        num_classes: classes of the head; 0 means no head (features out of `forward`).
        width: hidden size D. depth: number of blocks. heads: attention heads. mlp_dim: MLP hidden size.
        pool: "token" reads the class token, "gap" averages the patch tokens.
        class_token: whether a class token is prepended (always with pool="token"; optional with "gap").
        fc_norm: with pool="gap", apply the final LayerNorm after pooling (timm's `fc_norm`) instead of before
            it on every token (official and big_vision code).
        representation_size: width of the optional pre-logits layer (Linear + tanh); None for none.
        qkv_bias: biases on the query/key/value projection.
        norm_eps: LayerNorm epsilon (1e-6 official and timm, 1e-12 Hugging Face, 1e-7 MindSpore).
        gelu: "exact" (erf) or "tanh" (the approximation JAX's nn.gelu uses by default).
        pos_embed: "learn" (a parameter) or "sincos" (fixed 2-D sin-cos, big_vision).
        dropout, attn_dropout, drop_path: regularisation rates (dropout after embeddings and in MLP/projection).
        dynamic_img_size: accept inputs of any size at forward time by resampling the position embeddings.
        pos_interp: "bicubic" (timm, HF) or "bilinear" (the official code's zoom) for resampling.
        pos_antialias: antialias when resampling to a smaller grid (timm does, Hugging Face does not).
        hybrid: ResNet v2 stage depths of a hybrid stem, () for the root block only, None for a plain ViT.
        stem_width: channels of the hybrid root convolution (64 x width factor).
        stem_numerics: weight standardisation and GroupNorm eps of the hybrid stem, as the official code
            ("official": (w - mean) / (std + 1e-5), eps 1e-6) or timm ("timm": / sqrt(var + 1e-8), eps 1e-5).
    """

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: Pool = "token"
    class_token: bool = True
    fc_norm: bool = False
    representation_size: int | None = None
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    gelu: Gelu = "exact"
    pos_embed: PosEmbed = "learn"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    dynamic_img_size: bool = False
    pos_interp: Interp = "bicubic"
    pos_antialias: bool = True
    hybrid: tuple[int, ...] | None = None
    stem_width: int = 64
    stem_numerics: StemNumerics = "official"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Values arrive from YAML, JSON, --set and tensor shapes: check their types here, so that a wrong one is
        # refused by name instead of failing later inside a layer.
        size = self.img_size
        if _is_int(size):
            size = (size, size)
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) for s in size)):
            raise ValueError(f"ViTConfig.img_size={self.img_size!r}; expected an integer or [height, width]")
        self.img_size = (int(size[0]), int(size[1]))
        if self.hybrid is not None:
            if not (isinstance(self.hybrid, (list, tuple)) and all(_is_int(d) and d >= 1 for d in self.hybrid)):
                raise ValueError(f"ViTConfig.hybrid={self.hybrid!r}; expected a list of stage depths >= 1, or null")
            self.hybrid = tuple(int(d) for d in self.hybrid)
        for name, least in _INTS.items():
            value = getattr(self, name)
            if name == "representation_size" and value is None:
                continue
            if not _is_int(value) or value < least:
                raise ValueError(f"ViTConfig.{name}={value!r}; expected an integer >= {least}")
            setattr(self, name, int(value))
        for name in _RATES:
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1):
                raise ValueError(f"ViTConfig.{name}={value!r}; expected a rate in [0, 1]")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name}={getattr(self, name)!r}; expected true or false")
        eps = self.norm_eps
        if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and 0 < eps < math.inf):
            raise ValueError(f"ViTConfig.norm_eps={eps!r}; expected a finite number > 0")
        self.validate()

    @property
    def stride(self) -> int:
        """Pixels per token side: the patch size times the stem's total stride."""
        return self.patch_size * self.stem_stride

    @property
    def stem_stride(self) -> int:
        return stem_stride(self.hybrid)

    @property
    def stem_channels(self) -> int:
        """Channels the hybrid stem hands to the patch embedding."""
        if not self.hybrid:
            return self.stem_width
        return self.stem_width * 4 * 2 ** (len(self.hybrid) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.stride, self.img_size[1] // self.stride)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def validate(self) -> None:
        """Refuse impossible combinations with the field and what is allowed."""
        choices = {
            "pool": Pool,
            "gelu": Gelu,
            "pos_embed": PosEmbed,
            "pos_interp": Interp,
            "stem_numerics": StemNumerics,
        }
        for name, kind in choices.items():
            allowed = kind.__args__
            if getattr(self, name) not in allowed:
                raise ValueError(f"ViTConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig.width={self.width} is not divisible by heads={self.heads}")
        if self.hybrid is not None and self.stem_width % 32:
            raise ValueError(
                f"ViTConfig.stem_width={self.stem_width}: the hybrid stem normalises in 32 groups (GroupNorm(32)), so "
                "its width must be a multiple of 32"
            )
        if self.pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.pool='token' needs class_token=True")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"ViTConfig.pos_embed='sincos' needs width divisible by 4, got {self.width}")
        if self.grid[0] * self.grid[1] > MAX_TOKENS:
            raise ValueError(
                f"ViTConfig.img_size={self.img_size} makes a {self.grid[0]}x{self.grid[1]} grid of tokens; at most "
                f"{MAX_TOKENS:,} are supported"
            )
        for side in self.img_size:
            if side % self.stride:
                raise ValueError(
                    f"ViTConfig.img_size={self.img_size} is not divisible by the token stride {self.stride} "
                    f"(patch_size={self.patch_size} x stem stride {self.stem_stride})"
                )

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with `changes` applied; unknown fields are refused by name."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["hybrid"] = None if self.hybrid is None else list(self.hybrid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
