"""Linen models: classic and differential-attention Vision Transformers.

vit.py (the ViT shared by every kind), multihead.py / differential.py /
differential_v2.py (the attention modules), attention_ops.py (the computation
paths), attention_impl.py (which path runs), registry.py (one entry per
attention kind), build.py (config.model -> ViT), stats.py (sizes and FLOPs),
intermediates.py (lambda and attention-map read-outs).
"""

from diffvit_jax.models.build import build_model
from diffvit_jax.models.differential import DifferentialAttention, lambda_init
from diffvit_jax.models.differential_v2 import DifferentialAttentionV2
from diffvit_jax.models.intermediates import attention_maps, lambda_per_layer
from diffvit_jax.models.multihead import MultiHeadAttention
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
]
