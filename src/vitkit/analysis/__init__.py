"""The paper's analyses (Fig. 6, Fig. 7, appendix D) on any model vitkit loads: attention rollout and per-head
attention maps, mean attention distance, position-embedding similarity and the patch-embedding filters' principal
components. Each returns numpy arrays; `vitkit analyze` draws them (`figures`) and writes the numbers as JSON.
"""

from .attention import AttentionMaps, attention_maps, attention_rollout, iter_attention, load_images, token_grid
from .distance import mean_attention_distance, mean_distance, patch_distances, sample_batches
from .filters import filter_components, principal_components
from .rollout import discard_lowest, fuse_heads, rollout, rollout_step, token_map
from .similarity import cosine_similarity_grid, grid_for_size, grid_pos_embed, posembed_similarity

__all__ = [
    "AttentionMaps",
    "attention_maps",
    "attention_rollout",
    "cosine_similarity_grid",
    "discard_lowest",
    "filter_components",
    "fuse_heads",
    "grid_for_size",
    "grid_pos_embed",
    "iter_attention",
    "load_images",
    "mean_attention_distance",
    "mean_distance",
    "patch_distances",
    "posembed_similarity",
    "principal_components",
    "rollout",
    "rollout_step",
    "sample_batches",
    "token_grid",
    "token_map",
]
