"""Self-attention: classic multi-head, differential (arXiv 2410.05258) and its V2 revision.

Shapes: B batch, T query tokens, S key tokens (S == T here), D model width.
Every module takes `num_heads`, the number of heads of the *classic* ViT of
the same width, so that one config field means the same thing for all kinds:

- MultiHeadAttention: num_heads heads of size D / num_heads.
- DifferentialAttention: H = num_heads // 2 pairs; q/k heads of size
  d = D / num_heads (2H of them, heads 2h and 2h+1 form pair h), value heads
  of size 2d (H of them). Same projections, so same parameter count, as the
  classic module, plus the lambda vectors and the head norm.
- DifferentialAttentionV2: H pairs of size 2d = D / H; q has 2H heads
  (query heads 2h and 2h+1 share k[h] and v[h]) and a token-wise
  lambda = sigmoid(x W_lambda) per pair.

Two computation paths, chosen by `impl`:
- 'fused': `jax.nn.dot_product_attention` (implementation=None, XLA/cuDNN choose).
  It has no attention-probability dropout, so a training step with
  attn_dropout > 0 takes the einsum path instead.
- 'einsum': explicit logits, float32 softmax and probabilities; it is the only
  path that `sow`s the attention maps into 'intermediates' (a no-op unless that
  collection is mutable, see `models.analysis.attention_maps`).

Params stay float32, activations are in `dtype`; logits, softmax and lambda
are float32.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.norms import HEAD_NORM_EPS, make_norm

Dtype = Any

ATTENTION_IMPLS = ("fused", "einsum")
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


def projection(features: int, *, use_bias: bool, dtype: Dtype, name: str) -> nn.Dense:
  """A Dense with float32 params, xavier-uniform kernel and zero bias (as timm's 'jax' init)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, name=name)


def attention_probs(query: jax.Array, key: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) in float32. query [B,T,N,h], key [B,S,N,h] -> [B,N,T,S]."""
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    scale: float) -> jax.Array:
  """`jax.nn.dot_product_attention`; query [B,T,N,h], key/value [B,S,K,h] -> [B,T,N,h].

  K may divide N (grouped queries): query head n then uses key/value head n // (N // K).
  """
  return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation=None)


class MultiHeadAttention(nn.Module):
  """Classic multi-head self-attention, timm's `Attention` (separate q/k/v kernels)."""

  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0  # after the output projection (timm's proj_drop)
  impl: str = "fused"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    scale = head_dim**-0.5
    heads = lambda name: projection(width, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(
        x).reshape(batch, tokens, self.num_heads, head_dim)
    q, k, v = heads("query"), heads("key"), heads("value")

    if self.impl == "einsum" or (train and self.attn_dropout > 0):
      probs = attention_probs(q, k, scale)
      self.sow("intermediates", "attn", probs)
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=not train)
      out = jnp.einsum("bnts,bsnh->btnh", probs.astype(self.dtype), v)
    else:
      out = fused_attention(q, k, v, scale)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return nn.Dropout(self.dropout)(out, deterministic=not train)


class DifferentialAttention(nn.Module):
  """Differential attention (arXiv 2410.05258), as timm's `DiffAttention`.

  For pair h: o_h = Norm((A1 - lambda A2) v[h]) * (1 - lambda_init), with
  A1 = softmax(q[2h] k[2h]^T / sqrt(d)), A2 = softmax(q[2h+1] k[2h+1]^T / sqrt(d)),
  lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init.
  """

  num_heads: int  # of the classic ViT; this module has num_heads // 2 pairs
  layer: int  # 1-based index of the block, sets lambda_init
  head_norm: str = "rmsnorm"  # per-head norm over 2d: 'rmsnorm' | 'layernorm' | 'none'
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "fused"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    batch, tokens, width = x.shape
    pairs = self.num_heads // 2
    head_dim = width // self.num_heads  # d: q/k heads; value heads are 2d
    scale = head_dim**-0.5
    dense = lambda name: projection(width, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(x)
    q = dense("query").reshape(batch, tokens, 2 * pairs, head_dim)
    k = dense("key").reshape(batch, tokens, 2 * pairs, head_dim)
    v = dense("value").reshape(batch, tokens, pairs, 2 * head_dim)
    init = nn.initializers.normal(stddev=LAMBDA_INIT_STD)
    lam = differential_lambda(
        *(self.param(name, init, (head_dim,), jnp.float32) for name in LAMBDA_VECTORS),
        layer=self.layer)

    if self.impl == "einsum" or (train and self.attn_dropout > 0):
      probs = attention_probs(q, k, scale)  # [B, 2H, T, S]
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=not train)
      probs = probs.reshape(batch, pairs, 2, tokens, tokens)
      attn1, attn2 = probs[:, :, 0], probs[:, :, 1]
      diff = attn1 - lam * attn2
      self.sow("intermediates", "attn1", attn1)
      self.sow("intermediates", "attn2", attn2)
      self.sow("intermediates", "lambda", lam)
      self.sow("intermediates", "diff", diff)
      out = jnp.einsum("bhts,bshd->bthd", diff.astype(self.dtype), v).astype(jnp.float32)
    else:
      # dot_product_attention wants value heads as large as query/key heads;
      # ours are twice as large. Zero-padding q and k to 2d leaves q.k (and,
      # with the explicit scale, the softmax) unchanged, so one call computes
      # A1 v[h] and A2 v[h] for every pair (v repeated for heads 2h and 2h+1).
      # Same FLOPs as splitting v into halves and two calls, one softmax less;
      # but twice the attention-matmul FLOPs of the einsum path, which applies
      # (A1 - lambda A2) to v once. While implementation=None means XLA (jax
      # 0.10), 'einsum' is the cheaper path for this module.
      pad = [(0, 0), (0, 0), (0, 0), (0, head_dim)]
      both = fused_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.repeat(v, 2, axis=2), scale)
      both = both.reshape(batch, tokens, pairs, 2, 2 * head_dim).astype(jnp.float32)
      out = both[..., 0, :] - lam * both[..., 1, :]

    if self.head_norm != "none":
      # One scale vector of size 2d shared by all heads, as timm's sub_norm.
      out = make_norm(self.head_norm, eps=HEAD_NORM_EPS, dtype=jnp.float32, name="head_norm")(out)
    out = (out * (1.0 - lambda_init(self.layer))).astype(self.dtype)
    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return nn.Dropout(self.dropout)(out, deterministic=not train)


class DifferentialAttentionV2(nn.Module):
  """Differential attention, January 2026 revision (token-wise lambda, no head norm).

  H = num_heads // 2 pairs of head size 2d = D / H. Query heads 2h and 2h+1
  share k[h] and v[h] (grouped-query attention with groups of two):
    out_h = softmax(q[2h] k[h]^T / sqrt(2d)) v[h]
            - lambda_h softmax(q[2h+1] k[h]^T / sqrt(2d)) v[h],
  lambda = sigmoid(x W_lambda) per token and pair. Versus the classic module it
  adds D*D (+ D bias) in the query projection and D*H in W_lambda.
  """

  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "fused"
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

    if self.impl == "einsum" or (train and self.attn_dropout > 0):
      q = q.reshape(batch, tokens, pairs, 2, head_dim)
      logits = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits * scale, axis=-1)
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=not train)
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
      both = fused_attention(q, k, v, scale).reshape(batch, tokens, pairs, 2, head_dim)
      both = both.astype(jnp.float32)
      out = (both[..., 0, :] - lam[..., None] * both[..., 1, :]).astype(self.dtype)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return nn.Dropout(self.dropout)(out, deterministic=not train)
