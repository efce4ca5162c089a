"""Differential attention, January 2026 revision (token-wise lambda, no head norm)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import fused_attention, projection
from diffvit_jax.models.dropout import Dropout

Dtype = Any


class DifferentialAttentionV2(nn.Module):
  """H = num_heads // 2 pairs of head size 2d = D / H; query heads 2h and 2h+1 share k[h], v[h].

    out_h = softmax(q[2h] k[h]^T / sqrt(2d)) v[h]
            - lambda_h softmax(q[2h+1] k[h]^T / sqrt(2d)) v[h],
  lambda = sigmoid(x W_lambda) per token and pair (grouped-query attention with
  groups of two). Versus the classic module it adds D*D (+ D bias) in the query
  projection and D*H in W_lambda.
  """

  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "einsum"  # resolved: 'einsum' | 'xla' | 'cudnn'
  chunk_bytes: int = 2**30
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    pairs = self.num_heads // 2
    head_dim = width // pairs  # 2d, the "full" head size
    scale = head_dim**-0.5
    dense = lambda features, name: projection(
        features, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(x)
    q = dense(2 * width, "query").reshape(batch, tokens, 2 * pairs, head_dim)
    k = dense(width, "key").reshape(batch, tokens, pairs, head_dim)
    v = dense(width, "value").reshape(batch, tokens, pairs, head_dim)
    # float32: a cheap [B, T, H] projection whose sigmoid weighs a difference.
    lam = nn.sigmoid(projection(pairs, use_bias=False, dtype=jnp.float32, name="lambda_proj")(
        x.astype(jnp.float32)))  # [B, T, H]

    if self.impl == "einsum":
      q = q.reshape(batch, tokens, pairs, 2, head_dim)
      logits = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits * scale, axis=-1)
      probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
      attn1, attn2 = probs[:, :, 0], probs[:, :, 1]  # [B, H, T, S]
      lam_q = jnp.transpose(lam, (0, 2, 1))  # [B, H, T]: one lambda per query token
      diff = attn1 - lam_q[..., None] * attn2
      self.sow("intermediates", "attn1", attn1)
      self.sow("intermediates", "attn2", attn2)
      self.sow("intermediates", "lambda", lam_q)
      self.sow("intermediates", "diff", diff)
      out = jnp.einsum("bhts,bshd->bthd", diff.astype(self.dtype), v)
    else:
      # Query head n uses key/value head n // 2: exactly the pairing above.
      both = fused_attention(self.impl, q, k, v, scale, chunk_bytes=self.chunk_bytes)
      both = both.reshape(batch, tokens, pairs, 2, head_dim).astype(jnp.float32)
      out = (both[..., 0, :] - lam[..., None] * both[..., 1, :]).astype(self.dtype)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
