"""diffvit_jax: classic ViT vs differential-attention ViT under one protocol."""

__version__ = "0.1.0"
