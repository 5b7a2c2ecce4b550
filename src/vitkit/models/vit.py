"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), section 3.1.

Module and parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, ...)
so that every checkpoint format is one key table away from this model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..preprocess import Preprocess, source_preprocess
from .config import ViTConfig
from .kernels import attention
from .linear import Linear
from .posembed import resample_pos_embed, resample_pos_embed_traced, sincos_2d
from .resnet import ResNetStem


class PatchEmbed(nn.Module):
    """Image -> patch tokens. A hybrid runs its ResNet stem first and embeds patches of the feature map."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.backbone = None
        cin = cfg.in_chans
        if cfg.hybrid is not None:
            self.backbone = ResNetStem(cfg.in_chans, cfg.hybrid, cfg.stem_width, cfg.stem_numerics)
            cin = self.backbone.out_channels
        self.stride = cfg.stride
        self.proj = nn.Conv2d(cin, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the token stride {self.stride}")
        if self.backbone is not None:
            x = self.backbone(x)
        x = self.proj(x)  # (B, D, H/p, W/p)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D), N = H/p * W/p in row-major order


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows q; k; v, as timm and torchvision)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.attn_drop = cfg.attn_dropout
        self.proj = Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> (B, T, D), or (B, queries, D): the outputs of the first `queries` tokens alone."""
        drop = self.attn_drop if self.training else 0.0
        out, attn = attention(self.qkv(x), self.heads, drop, need_weights, queries)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_dim)
        self.gelu = "tanh" if cfg.gelu == "tanh" else "none"  # the approximation the weights were trained with
        self.fc2 = Linear(cfg.mlp_dim, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.fc1.forward_gelu(x, self.gelu))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a block's residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper equations 2 and 3)."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> (B, T, D), or (B, queries, D): the first `queries` tokens' outputs alone, which attend to
        every token but skip the rest of the block for the others."""
        y, attn = self.attn(self.norm1(x), need_weights, queries)
        x = x[:, :queries] + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class VisionTransformer(nn.Module):
    """ViT and its hybrids, built from one `ViTConfig`.

    forward(x) = forward_head(forward_features(x)), but for a class-token head the last block computes that token's
    output alone; `forward_intermediates` returns hidden states and attention probabilities of chosen layers in the
    same pass.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        n_pos = cfg.num_prefix_tokens + cfg.grid[0] * cfg.grid[1]
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.width))
        else:
            # Fixed, so not saved: any grid is computed exactly when needed.
            prefix = torch.zeros(1, cfg.num_prefix_tokens, cfg.width)
            self.register_buffer("pos_embed", torch.cat([prefix, sincos_2d(cfg.grid, cfg.width)], 1), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        # Stochastic depth grows linearly with depth, 0 at the first block.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        post_pool_norm = cfg.pool == "gap" and cfg.fc_norm
        self.norm = nn.Identity() if post_pool_norm else nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if post_pool_norm else nn.Identity()
        self.pre_logits = nn.Identity()
        head_in = cfg.width
        if cfg.representation_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", Linear(cfg.width, cfg.representation_size))
            self.pre_logits.add_module("act", nn.Tanh())
            head_in = cfg.representation_size
        self.head = Linear(head_in, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()
        # What travels with the weights: how inputs are made, and the names of the classes when known.
        self.preprocess: Preprocess = source_preprocess("vitkit", cfg.img_size, cfg.in_chans)
        self.classes: list[str] | None = None
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them: training memory
        for the blocks drops from depth x (activations of a block) to one block's, for about a third more time."""
        self.grad_checkpointing = enabled

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official JAX initialisation: xavier-uniform dense kernels, lecun-normal patch embedding,
        position embeddings N(0, 0.02), a zero class token; the head truncated-normal with std 0.02. (A head
        replaced for fine-tuning starts at zero instead, paper section 3.2; `load_pretrained` does that.)"""
        _init_dense(self)
        for block in self.blocks:
            _init_mlp_biases(block)
        fan_in = self.patch_embed.proj.in_channels * self.patch_embed.proj.kernel_size[0] ** 2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=(1.0 / fan_in) ** 0.5)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def reinit_last_blocks(self, n: int) -> None:
        """Fresh weights, drawn as `reset_parameters` draws them, for the last `n` blocks and the norms after them:
        for fine-tuning on a task far from the pretraining, whose top blocks hold features of the old task (the
        re-initialisation of Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning")."""
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"re-initialise {n} blocks: expected 0 to {len(self.blocks)}, the model's depth")
        if n == 0:
            return
        for block in self.blocks[len(self.blocks) - n :]:
            _init_dense(block)
            _init_mlp_biases(block)
            block.norm1.reset_parameters()
            block.norm2.reset_parameters()
        for norm in (self.norm, self.fc_norm):
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()

    # ---- embedding -------------------------------------------------------------------------------------------
    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if not all(isinstance(side, int) for side in grid):
            return self._pos_embed_for_traced(grid)  # sizes of a graph being exported
        if grid == self.cfg.grid:
            return self.pos_embed
        if not self.cfg.dynamic_img_size:
            h, w = grid[0] * self.cfg.stride, grid[1] * self.cfg.stride
            raise ValueError(
                f"input {h}x{w} differs from the model's img_size {self.cfg.img_size}; build the model with "
                "dynamic_img_size=True to resample position embeddings at forward time"
            )
        if self.cfg.pos_embed == "sincos":
            prefix = self.pos_embed[:, : self.cfg.num_prefix_tokens]
            return torch.cat([prefix, sincos_2d(grid, self.cfg.width).to(prefix)], 1)
        cfg = self.cfg
        return resample_pos_embed(
            self.pos_embed, grid, cfg.grid, cfg.num_prefix_tokens, cfg.pos_interp, cfg.pos_antialias
        )

    def _pos_embed_for_traced(self, grid: tuple) -> torch.Tensor:
        """Position embeddings for a grid of traced sizes (an ONNX export with dynamic height and width): the same
        numbers as the eager path, computed without Python branches on the sizes, which a trace would freeze."""
        cfg = self.cfg
        if not cfg.dynamic_img_size:
            return self.pos_embed  # a fixed-size model: any other size fails in the graph, as it does here
        if cfg.pos_embed == "sincos":
            prefix = self.pos_embed[:, : cfg.num_prefix_tokens]
            return torch.cat([prefix, sincos_2d(grid, cfg.width).to(prefix)], 1)
        return resample_pos_embed_traced(
            self.pos_embed, grid, cfg.grid, cfg.num_prefix_tokens, cfg.pos_interp, cfg.pos_antialias
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D): patch tokens, class token, position embeddings, dropout."""
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid).to(x.dtype))

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, last_queries: int | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D) tokens after the last block and the encoder norm; with `last_queries`,
        (B, last_queries, D): the last block computes the outputs of the first `last_queries` tokens alone."""
        x = self.embed(x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            queries = last_queries if i == len(self.blocks) - 1 else None
            # The non-reentrant checkpoint restores the RNG state, so dropout and stochastic depth draw the same
            # masks when recomputing.
            x, _ = checkpoint(block, x, False, queries, use_reentrant=False) if recompute else block(x, False, queries)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) tokens -> (B, num_classes) logits, or the vector fed to the head when `pre_logits`."""
        if self.cfg.pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.cfg.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A class-token head reads one token of the last block's output, and nothing else depends on the others'
        # MLP or attention output there, so the last block skips them: 6% of ViT-B/16's work, the same logits.
        last_queries = 1 if self.cfg.pool == "token" else None
        return self.forward_head(self.forward_features(x, last_queries))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        layers: int | Iterable[int] | None = None,
        attn_layers: int | Iterable[int] | None = (),
        norm: bool = False,
    ) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """One pass that also returns what chosen blocks produced.

        Args:
            x: (B, C, H, W) images.
            layers: blocks whose output tokens to return: None for all, an int n for the last n, or indices
                (negative ones count from the end).
            attn_layers: blocks whose attention probabilities to return, same forms; () for none. Only these
                blocks take the manual attention path; the others stay on the fused kernel.
            norm: apply the encoder norm to the returned hidden states.

        Returns:
            {"features": (B, T, D) as forward_features, "logits": forward_head of it,
             "hidden": {block: (B, T, D)}, "attn": {block: (B, heads, T, T)}}.
        """
        keep_hidden = set(layer_indices(layers, len(self.blocks)))
        keep_attn = set(layer_indices(attn_layers, len(self.blocks)))
        hidden, attn = {}, {}
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            x, a = block(x, need_weights=i in keep_attn)
            if i in keep_hidden:
                hidden[i] = self.norm(x) if norm else x
            if a is not None:
                attn[i] = a
        features = self.norm(x)
        return {"features": features, "logits": self.forward_head(features), "hidden": hidden, "attn": attn}


def layer_indices(layers: int | Iterable[int] | None, depth: int) -> list[int]:
    """Blocks to act on, sorted: None for all, an int n for the last n, or indices (negative count from the end)."""
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int):
        return list(range(max(depth - layers, 0), depth))
    out = set()
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer {i} is out of range for a model with {depth} blocks")
        out.add(j)
    return sorted(out)


def _init_dense(module: nn.Module) -> None:
    """The official initialisation of every dense and convolution layer in `module`: xavier-uniform kernels (He
    normal for the hybrid stem's convolutions), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _init_mlp_biases(block: Block) -> None:
    nn.init.normal_(block.mlp.fc1.bias, std=1e-6)
    nn.init.normal_(block.mlp.fc2.bias, std=1e-6)
