"""vitkit: the Vision Transformers of "An Image is Worth 16x16 Words", every checkpoint format, exact numerics."""

from .checkpoints import convert, load_pretrained, read_checkpoint, save_pretrained
from .models import VisionTransformer, ViTConfig, count_macs, count_params, create_model, list_models
from .preprocess import Preprocess

__all__ = [
    "Preprocess",
    "ViTConfig",
    "VisionTransformer",
    "convert",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "load_pretrained",
    "read_checkpoint",
    "save_pretrained",
]
__version__ = "0.1.0"
