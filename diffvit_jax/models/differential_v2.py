"""Differential attention, January 2026 revision (token-wise lambda, no head norm).

With H = num_heads // 2 pairs of head size 2d = D / H, query heads 2h and 2h+1
sharing k_h and v_h (grouped-query attention with groups of two):

  out_h = (softmax(q_{2h} k_h^T / sqrt(2d)) - lambda_h softmax(q_{2h+1} k_h^T / sqrt(2d))) v_h
  lambda = sigmoid(x W_lambda), one value per token and pair
  out = concat_h(out_h) Wo

Versus the classic module it adds D*D (+ D bias) in the query projection and
D*H in W_lambda.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import attention, projection
from diffvit_jax.models.dropout import Dropout

Dtype = Any


class DifferentialAttentionV2(nn.Module):
  """The formula above; parameters query/key/value/out and lambda_proj."""

  num_heads: int  # of the classic ViT; this module has num_heads // 2 pairs
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
    head_dim = width // pairs  # 2d
    dense = lambda features, name, bias=self.qkv_bias, dtype=self.dtype: projection(
        features, use_bias=bias, dtype=dtype, dot_general=self.dot_general, name=name)
    q = dense(2 * width, "query")(x).reshape(batch, tokens, 2 * pairs, head_dim)
    k = dense(width, "key")(x).reshape(batch, tokens, pairs, head_dim)
    v = dense(width, "value")(x).reshape(batch, tokens, pairs, head_dim)
    # float32: a cheap [B, T, H] projection whose sigmoid weighs a difference.
    lam = nn.sigmoid(dense(pairs, "lambda_proj", bias=False, dtype=jnp.float32)(
        x.astype(jnp.float32)))
    out = attention(q, k, v, scale=head_dim**-0.5, impl=self.impl, lam=lam,
                    chunk_bytes=self.chunk_bytes,
                    dropout=Dropout(self.attn_dropout, deterministic=not train), sow=self.sow)
    out = dense(width, "out", bias=True)(out.astype(self.dtype).reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
