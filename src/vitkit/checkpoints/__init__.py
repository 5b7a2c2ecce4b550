"""Checkpoints: read every ViT format into vitkit's names, write vitkit, official npz, Hugging Face and timm."""

from .load import load_pretrained, read_checkpoint
from .save import convert, save_pretrained

__all__ = ["convert", "load_pretrained", "read_checkpoint", "save_pretrained"]
