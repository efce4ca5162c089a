"""Classic multi-head self-attention (timm's `Attention`)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import einsum_probs, fused_attention, projection
from diffvit_jax.models.dropout import Dropout

Dtype = Any


class MultiHeadAttention(nn.Module):
  """num_heads heads of size D / num_heads; separate q/k/v kernels, as timm's `Attention`.

  `impl` is a resolved path ('einsum' | 'xla' | 'cudnn', see
  `models.attention_impl`); only 'einsum' sows the maps and drops probabilities.
  """

  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0  # after the output projection (timm's proj_drop)
  impl: str = "einsum"
  chunk_bytes: int = 2**30
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    scale = head_dim**-0.5
    heads = lambda name: projection(width, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(
        x).reshape(batch, tokens, self.num_heads, head_dim)
    q, k, v = heads("query"), heads("key"), heads("value")

    if self.impl == "einsum":
      probs = einsum_probs(q, k, scale)
      self.sow("intermediates", "attn", probs)
      probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
      out = jnp.einsum("bnts,bsnh->btnh", probs.astype(self.dtype), v)
    else:
      out = fused_attention(self.impl, q, k, v, scale, chunk_bytes=self.chunk_bytes)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
