"""Differential attention (arXiv 2410.05258), as timm's `DiffAttention`.

On cuDNN it runs as one call with q/k zero-padded from d to v's head size 2d, so each
softmax is computed once (the public API has no v heads larger than q's); checked against
the formula with the same call on XLA (tests/test_attention_forms.py).
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.models.attention_ops import batch_chunked, einsum_probs, projection
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _differential_flash_xla(query: jax.Array, key: jax.Array, value: jax.Array,
                            lam: jax.Array, scale: float) -> jax.Array:
  """(A1 - lam A2) v with a flash-style backward pass; float32 [B,T,H,2d].

  query/key [B,T,2H,d] (heads 2h, 2h+1 form pair h), value [B,T,H,2d]. The
  probability-value product is done once, on the difference (half the work of
  two attention calls with v), and the backward pass keeps only q, k, v and
  the log-sum-exp of each softmax.
  """
  return _differential_fwd(query, key, value, lam, scale)[0]


def _differential_probs(query, key, scale, log_total=None):
  """(probabilities [B,H,2,T,S], log-sum-exp [B,2H,T,1]), recomputed from log_total if given."""
  batch, tokens, heads, _ = query.shape
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  if log_total is None:
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs, log_total = unnormalised / total, peak + jnp.log(total)
  else:
    probs = jnp.exp(logits - log_total)
  return probs.reshape(batch, heads // 2, 2, tokens, key.shape[1]), log_total


def _differential_fwd(query, key, value, lam, scale):
  probs, log_total = _differential_probs(query, key, scale)
  diff = (probs[:, :, 0] - lam * probs[:, :, 1]).astype(value.dtype)
  out = jnp.einsum("bhts,bshd->bthd", diff, value, preferred_element_type=jnp.float32)
  return out, (query, key, value, lam, log_total)


def _differential_bwd(scale, residuals, dout):
  query, key, value, lam, log_total = residuals
  probs, _ = _differential_probs(query, key, scale, log_total)
  diff = (probs[:, :, 0] - lam * probs[:, :, 1]).astype(value.dtype)
  dvalue = jnp.einsum("bhts,bthd->bshd", diff, dout.astype(value.dtype),
                      preferred_element_type=jnp.float32)
  ddiff = jnp.einsum("bthd,bshd->bhts", dout.astype(value.dtype), value,
                     preferred_element_type=jnp.float32)
  dlam = -jnp.sum(ddiff * probs[:, :, 1])
  dprobs = jnp.stack([ddiff, -lam * ddiff], axis=2)  # [B,H,2,T,S]
  dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True)) * scale
  dlogits = dlogits.reshape(log_total.shape[:3] + (key.shape[1],)).astype(query.dtype)
  dquery = jnp.einsum("bnts,bsnh->btnh", dlogits, key, preferred_element_type=jnp.float32)
  dkey = jnp.einsum("bnts,btnh->bsnh", dlogits, query, preferred_element_type=jnp.float32)
  return (dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype),
          dlam.astype(lam.dtype))


_differential_flash_xla.defvjp(_differential_fwd, _differential_bwd)


def differential_xla(query, key, value, lam, scale: float, *, chunk_bytes: int) -> jax.Array:
  """The 'xla' form: (A1 - lam A2) v formed before one value product, batch-chunked.

  Half the probability-value work of `differential_cudnn`; float32 [B,T,H,2d].
  """
  _, tokens, heads, _ = query.shape
  core = lambda q, k, v: _differential_flash_xla(q, k, v, lam, scale)
  return batch_chunked(core, query, key, value, bytes_per_example=4 * heads * tokens**2,
                       chunk_bytes=chunk_bytes)


def differential_cudnn(query, key, value, lam, scale: float, *,
                       implementation: str | None = "cudnn") -> jax.Array:
  """The 'cudnn' form: one fused call at head size 2d, one softmax per head; float32 [B,T,H,2d].

  `jax.nn.dot_product_attention` needs v heads of q's size, and v's (2d) are twice q's (d):
  q and k [B,T,2H,d] are zero-padded to 2d (q.k unchanged, so `scale` is passed as given)
  and v [B,T,H,2d] is repeated for heads 2h, 2h+1, so head 2h gives A1 v[h] and head 2h+1
  A2 v[h]. `implementation='xla'` runs the same form off the GPU (the tests).
  """
  batch, tokens, pairs, twice_d = value.shape
  pad = [(0, 0)] * 3 + [(0, twice_d - query.shape[-1])]
  both = jax.nn.dot_product_attention(
      jnp.pad(query, pad), jnp.pad(key, pad), jnp.repeat(value, 2, axis=2), scale=scale,
      implementation=implementation)
  both = both.reshape(batch, tokens, pairs, 2, twice_d).astype(jnp.float32)
  return both[..., 0, :] - lam * both[..., 1, :]


class DifferentialAttention(nn.Module):
  """Differential attention (arXiv 2410.05258), as timm's `DiffAttention`.

  H = num_heads // 2 pairs; q/k heads of size d = D / num_heads (2H of them,
  heads 2h and 2h+1 form pair h), value heads of size 2d (H of them): the same
  projections, so the same parameter count, as the classic module, plus the
  lambda vectors and the head norm. For pair h:
  o_h = Norm((A1 - lambda A2) v[h]) * (1 - lambda_init), with
  A1 = softmax(q[2h] k[2h]^T / sqrt(d)), A2 = softmax(q[2h+1] k[2h+1]^T / sqrt(d)),
  lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init.
  """

  num_heads: int  # of the classic ViT; this module has num_heads // 2 pairs
  layer: int  # 1-based index of the block, sets lambda_init
  head_norm: str = "rmsnorm"  # per-head norm over 2d: 'rmsnorm' | 'layernorm' | 'none'
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

    if self.impl == "einsum":
      probs = einsum_probs(q, k, scale)  # [B, 2H, T, S]
      probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
      probs = probs.reshape(batch, pairs, 2, tokens, tokens)
      attn1, attn2 = probs[:, :, 0], probs[:, :, 1]
      diff = attn1 - lam * attn2
      self.sow("intermediates", "attn1", attn1)
      self.sow("intermediates", "attn2", attn2)
      self.sow("intermediates", "lambda", lam)
      self.sow("intermediates", "diff", diff)
      out = jnp.einsum("bhts,bshd->bthd", diff.astype(self.dtype), v).astype(jnp.float32)
    elif self.impl == "xla":
      out = differential_xla(q, k, v, lam, scale, chunk_bytes=self.chunk_bytes)
    elif self.impl == "cudnn":
      out = differential_cudnn(q, k, v, lam, scale)
    else:
      raise ValueError(f"Unresolved attention impl {self.impl!r}.")

    if self.head_norm != "none":
      # One scale vector of size 2d shared by all heads, as timm's sub_norm.
      out = make_norm(self.head_norm, eps=HEAD_NORM_EPS, dtype=jnp.float32, name="head_norm")(out)
    out = (out * (1.0 - lambda_init(self.layer))).astype(self.dtype)
    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
