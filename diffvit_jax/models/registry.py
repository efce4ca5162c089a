"""The attention kinds: one entry per `config.model.arch`, everything else reads it from here.

A new attention kind is one module plus one entry below: the ViT builds its
blocks from `module` and `layer_fields`, the config schema takes its choices
from `ARCHS` and adds each kind's `config_fields`, and the stats, reports and
tools read the label, FLOP factor, lambda read-out and head sizes from the entry.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from diffvit_jax.models import differential, norms
from diffvit_jax.models.differential import DifferentialAttention
from diffvit_jax.models.differential_v2 import DifferentialAttentionV2
from diffvit_jax.models.multihead import MultiHeadAttention


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """What every attention kind says.

  `module` is called with name='attn' and the fields num_heads, qkv_bias,
  attn_dropout, dropout, impl, chunk_bytes, dtype and dot_general, plus what
  `layer_fields` returns.
  """

  label: str  # in tables and figures
  module: type  # the linen attention module
  # Whether it pairs the classic ViT's heads (num_heads // 2 pairs; num_heads must be even).
  differential: bool
  # D_qk / D: width of the query-key product relative to the model width (FLOP count).
  qk_width_factor: int
  # model config -> the (q/k, v) head sizes a fused kernel sees (cuDNN's constraints).
  fused_head_dims: Callable[[Any], tuple[int, int]]
  # (this kind's `config_fields` values, 1-based layer) -> more module fields.
  layer_fields: Callable[[Mapping, int], dict] = lambda fields, layer: {}
  # config.model fields of this kind only: name -> (default, allowed values).
  config_fields: Mapping[str, tuple[Any, tuple]] = dataclasses.field(default_factory=dict)
  # (params, model config) -> lambda per layer [depth], or None where lambda is not a
  # per-layer scalar.
  lambda_per_layer: Callable[[Any, Any], Any] | None = None


def _classic_head(m):
  return m.width // m.num_heads


ARCHS: dict[str, AttentionKind] = {
    "vit": AttentionKind(
        label="ViT", module=MultiHeadAttention, differential=False, qk_width_factor=1,
        fused_head_dims=lambda m: (_classic_head(m), _classic_head(m))),
    "diffvit": AttentionKind(
        label="DiffViT", module=DifferentialAttention, differential=True, qk_width_factor=1,
        # cuDNN sees q/k zero-padded to v's head size 2d (`attention_ops.differential_cudnn`).
        fused_head_dims=lambda m: (2 * _classic_head(m), 2 * _classic_head(m)),
        layer_fields=lambda fields, layer: dict(layer=layer, head_norm=fields["diff_head_norm"]),
        # The per-head norm: 'rmsnorm' (the paper) | 'layernorm' | 'none'.
        config_fields={"diff_head_norm": ("rmsnorm", norms.HEAD_NORMS)},
        lambda_per_layer=differential.lambda_per_layer),
    "diffvit2": AttentionKind(
        label="DiffViT-v2", module=DifferentialAttentionV2, differential=True, qk_width_factor=2,
        fused_head_dims=lambda m: (2 * _classic_head(m), 2 * _classic_head(m))),
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


def config_fields() -> dict[str, tuple[Any, tuple]]:
  """Every kind's own config.model fields (in every config, whatever its arch)."""
  fields = {}
  for arch, entry in ARCHS.items():
    for name, spec in entry.config_fields.items():
      if name in fields and fields[name] != spec:
        raise ValueError(f"Attention kind {arch!r} redeclares config.model.{name}.")
      fields[name] = spec
  return fields
