"""The attention kinds: one entry per `config.model.arch`, everything else reads it from here.

A new attention kind is one module plus one entry below: the ViT builds its
blocks from `module` and `layer_fields`, the config schema takes its choices
from `ARCHS`, and the stats, reports, tools and timm interop read the label,
FLOP factor, lambda read-out and head sizes from the entry instead of testing
arch names.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from diffvit_jax.models import differential
from diffvit_jax.models.differential import DifferentialAttention
from diffvit_jax.models.differential_v2 import DifferentialAttentionV2
from diffvit_jax.models.multihead import MultiHeadAttention


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  label: str  # for tables and figures
  module: type  # the linen attention module
  # Whether it pairs the classic ViT's heads (num_heads // 2 pairs; num_heads must be even).
  differential: bool
  # Module fields that depend on the block: (model config or ViT, 1-based layer) -> kwargs.
  layer_fields: Callable[[Any, int], dict]
  # D_qk / D: width of the query-key product relative to the model width (FLOP count).
  qk_width_factor: int
  # (params, model config) -> lambda per layer [depth], or None where lambda is not a
  # per-layer scalar.
  lambda_per_layer: Callable[[Any, Any], Any] | None
  # model config -> the (q/k, v) head sizes a fused kernel sees (cuDNN's constraints).
  fused_head_dims: Callable[[Any], tuple[int, int]]
  color: str  # in figures
  timm_attn_layer: str | None  # timm VisionTransformer's attn_layer, None if timm has none


def _classic_head(m):
  return m.width // m.num_heads


ARCHS: dict[str, AttentionKind] = {
    "vit": AttentionKind(
        label="ViT", module=MultiHeadAttention, differential=False,
        layer_fields=lambda m, layer: {}, qk_width_factor=1, lambda_per_layer=None,
        fused_head_dims=lambda m: (_classic_head(m), _classic_head(m)),
        color="tab:blue", timm_attn_layer="attn"),
    "diffvit": AttentionKind(
        label="DiffViT", module=DifferentialAttention, differential=True,
        layer_fields=lambda m, layer: dict(layer=layer, head_norm=m.diff_head_norm),
        qk_width_factor=1, lambda_per_layer=differential.lambda_per_layer,
        # cuDNN sees q/k zero-padded to v's head size 2d (`attention_ops.differential_cudnn`).
        fused_head_dims=lambda m: (2 * _classic_head(m), 2 * _classic_head(m)),
        color="tab:red", timm_attn_layer="diff"),
    "diffvit2": AttentionKind(
        label="DiffViT-v2", module=DifferentialAttentionV2, differential=True,
        layer_fields=lambda m, layer: {}, qk_width_factor=2, lambda_per_layer=None,
        fused_head_dims=lambda m: (2 * _classic_head(m), 2 * _classic_head(m)),
        color="tab:green", timm_attn_layer=None),
}


# The classic ViT: what the other kinds are compared with (extra parameters, CE baselines).
BASELINE_ARCH = "vit"


def kind(arch: str) -> AttentionKind:
  return ARCHS[arch]


def label(arch: str) -> str:
  """Display label of an arch; unknown names (runs of other code) are shown as they are."""
  return ARCHS[arch].label if arch in ARCHS else arch


def attention_heads(model_config) -> int:
  """Heads as the attention kind counts them: classic heads, or pairs for differential kinds."""
  heads = model_config.num_heads
  return heads // 2 if ARCHS[model_config.arch].differential else heads
