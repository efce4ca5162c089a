"""Classic multi-head self-attention (timm's `Attention`).

  out = concat_n(softmax(q_n k_n^T / sqrt(h)) v_n) Wo,   q = x Wq, k = x Wk, v = x Wv,

with N heads of size h = D / N.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import attention, projection
from diffvit_jax.models.dropout import Dropout

Dtype = Any


class MultiHeadAttention(nn.Module):
  """num_heads heads of size D / num_heads; separate q/k/v kernels, as timm's `Attention`."""

  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0  # after the output projection (timm's proj_drop)
  impl: str = "einsum"  # resolved path: 'einsum' | 'xla' | 'cudnn' (models/attention_ops.py)
  chunk_bytes: int = 2**30
  dtype: Dtype = jnp.float32
  dot_general: Callable | None = None  # of every Dense (None: lax.dot_general)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name, bias=self.qkv_bias: projection(
        width, use_bias=bias, dtype=self.dtype, dot_general=self.dot_general, name=name)
    heads = lambda name: dense(name)(x).reshape(batch, tokens, self.num_heads, head_dim)
    q, k, v = heads("query"), heads("key"), heads("value")
    out = attention(q, k, v, scale=head_dim**-0.5, impl=self.impl, chunk_bytes=self.chunk_bytes,
                    dropout=Dropout(self.attn_dropout, deterministic=not train), sow=self.sow)
    out = dense("out", bias=True)(out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
