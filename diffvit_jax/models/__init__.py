"""Linen models: classic and differential-attention Vision Transformers."""

from diffvit_jax.models.analysis import attention_maps, lambda_per_layer
from diffvit_jax.models.attention import (
    DifferentialAttention,
    DifferentialAttentionV2,
    MultiHeadAttention,
    lambda_init,
)
from diffvit_jax.models.build import build_model, validate
from diffvit_jax.models.vit import ViT

__all__ = [
    "DifferentialAttention",
    "DifferentialAttentionV2",
    "MultiHeadAttention",
    "ViT",
    "attention_maps",
    "build_model",
    "lambda_init",
    "lambda_per_layer",
    "validate",
]
