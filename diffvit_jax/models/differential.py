"""Differential attention (arXiv 2410.05258), as timm's `DiffAttention`.

With H = num_heads // 2 pairs, q/k heads of size d = D / num_heads (2H of them,
heads 2h and 2h+1 form pair h) and value heads of size 2d (H of them), in layer l:

  A1 = softmax(q_{2h} k_{2h}^T / sqrt(d)),  A2 = softmax(q_{2h+1} k_{2h+1}^T / sqrt(d))
  lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init(l)
  o_h = Norm((A1 - lambda A2) v_h) * (1 - lambda_init(l))
  out = concat_h(o_h) Wo

The projections are the classic module's (the same parameter count) plus the
four lambda vectors and the head norm.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import attention, projection
from diffvit_jax.models.dropout import Dropout
from diffvit_jax.models.norms import HEAD_NORM_EPS, make_norm

Dtype = Any

LAMBDA_INIT_STD = 0.1
LAMBDA_VECTORS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def lambda_init(layer: int) -> float:
  """lambda_init(l) = 0.8 - 0.6 exp(-0.3 (l - 1)) for the 1-based layer index l.

  timm writes the same value as 0.8 - 0.6 exp(-0.3 depth) with its 0-based
  block index `depth`.
  """
  return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def differential_lambda(q1, k1, q2, k2, *, layer: int):
  """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init(layer)."""
  return jnp.exp(jnp.dot(q1, k1)) - jnp.exp(jnp.dot(q2, k2)) + lambda_init(layer)


def lambda_per_layer(params, model_config):
  """The scalar lambda of every layer, [depth] (the registry's read-out for 'diffvit')."""
  return jnp.stack([
      differential_lambda(*(params[f"block_{i}"]["attn"][name] for name in LAMBDA_VECTORS),
                          layer=i + 1)
      for i in range(model_config.depth)])


class DifferentialAttention(nn.Module):
  """The formula above; `head_norm` 'rmsnorm' (the paper), 'layernorm' or 'none'."""

  num_heads: int  # of the classic ViT; this module has num_heads // 2 pairs
  layer: int  # 1-based index of the block, sets lambda_init
  head_norm: str = "rmsnorm"  # per-head norm over 2d: 'rmsnorm' | 'layernorm' | 'none'
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "einsum"  # resolved path: 'einsum' | 'xla' | 'cudnn' (models/attention_ops.py)
  chunk_bytes: int = 2**30
  dtype: Dtype = jnp.float32
  dot_general: Callable | None = None  # of every Dense (None: lax.dot_general)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    pairs = self.num_heads // 2
    head_dim = width // self.num_heads  # d
    dense = lambda name, bias=self.qkv_bias: projection(
        width, use_bias=bias, dtype=self.dtype, dot_general=self.dot_general, name=name)
    q = dense("query")(x).reshape(batch, tokens, 2 * pairs, head_dim)
    k = dense("key")(x).reshape(batch, tokens, 2 * pairs, head_dim)
    v = dense("value")(x).reshape(batch, tokens, pairs, 2 * head_dim)
    init = nn.initializers.normal(stddev=LAMBDA_INIT_STD)
    lam = differential_lambda(
        *(self.param(name, init, (head_dim,), jnp.float32) for name in LAMBDA_VECTORS),
        layer=self.layer)
    out = attention(q, k, v, scale=head_dim**-0.5, impl=self.impl, lam=lam,
                    chunk_bytes=self.chunk_bytes,
                    dropout=Dropout(self.attn_dropout, deterministic=not train), sow=self.sow)
    if self.head_norm != "none":  # one scale vector of size 2d for all heads (timm's sub_norm)
      out = make_norm(self.head_norm, eps=HEAD_NORM_EPS, dtype=jnp.float32, name="head_norm")(out)
    out = (out * (1.0 - lambda_init(self.layer))).astype(self.dtype)
    out = dense("out", bias=True)(out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
