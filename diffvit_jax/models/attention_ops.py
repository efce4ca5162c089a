"""Softmax attention, classic or differential, by the path `impl` names.

  A_n            = softmax(q_n k_{n // G}^T * scale)              (G = N / K query heads per key)
  classic:       out_n = A_n v_{n // G}
  differential:  out_h = (A_{2h} - lambda A_{2h+1}) v_h           (lambda a scalar or per token)

q [B, T, N, h], k [B, S, K, h], v [B, S, K, h_v] (classic) or [B, S, N / 2, h_v]
(differential). `impl` is a resolved path (`models.attention_impl.resolve`):
'einsum' (explicit probabilities, the only path that sows maps and drops
probabilities), 'xla' (a flash-attention-style custom VJP over batch chunks) or
'cudnn' (`jax.nn.dot_product_attention`). Logits, softmax and the difference are
float32; parameters float32, activations in `dtype`.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def projection(features: int, *, use_bias: bool, dtype: Dtype, name: str,
               dot_general: Callable | None = None) -> nn.Dense:
  """A Dense with float32 params, xavier-uniform kernel and zero bias (as timm's 'jax' init)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, dot_general=dot_general, name=name)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float, impl: str,
              lam: jax.Array | None = None, chunk_bytes: int = 2**30,
              dropout: Callable | None = None, sow: Callable | None = None) -> jax.Array:
  """out [B, T, N, h_v] (classic, in v's dtype) or [B, T, N / 2, h_v] (differential, float32).

  `lam` None is the classic form; a scalar or [B, T, N / 2] the differential one.
  'einsum' only: `dropout` (probabilities -> probabilities) and `sow` (a module's
  `sow`, given 'attn', or 'attn1', 'attn2', 'lambda', 'diff').
  """
  if impl == "einsum":
    return _einsum_attention(query, key, value, scale, lam, dropout, sow)
  if impl == "xla":
    return _xla_attention(query, key, value, scale, lam, chunk_bytes)
  if impl == "cudnn":
    return differential_cudnn(query, key, value, lam, scale)
  raise ValueError(f"Unresolved attention impl {impl!r} ('einsum', 'xla', 'cudnn').")


def repeat_heads(x: jax.Array, heads: int) -> jax.Array:
  """x [B, S, K, h] with head k repeated for heads k*G .. k*G + G-1 (G = heads / K)."""
  return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


def _pairs_layout(lam):
  """lambda as the [B, N/2, T, S] products broadcast it: a scalar, or [B, T, H] -> [B, H, T, 1]."""
  if lam is None or jnp.ndim(lam) == 0:
    return lam
  return jnp.transpose(lam, (0, 2, 1))[..., None]


def _mix(probs: jax.Array, lam) -> jax.Array:
  """The weights of the value product: A, or A_{2h} - lambda A_{2h+1} over pairs of heads."""
  if lam is None:
    return probs
  batch, heads, tokens, keys = probs.shape
  pairs = probs.reshape(batch, heads // 2, 2, tokens, keys)
  return pairs[:, :, 0] - lam * pairs[:, :, 1]


def _values(weights: jax.Array, value: jax.Array, **kwargs) -> jax.Array:
  """sum_s weights[b, m, t, s] value[b, s, m] -> [B, T, M, h_v] (in v's dtype unless kwargs)."""
  return jnp.einsum("bmts,bsmd->btmd", weights.astype(value.dtype), value, **kwargs)


def _logits(query, key, scale):
  return jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale


def _einsum_attention(query, key, value, scale, lam, dropout, sow):
  heads = query.shape[2]
  key = repeat_heads(key, heads)
  probs = jax.nn.softmax(_logits(query, key, scale), axis=-1)  # [B, N, T, S]
  if dropout is not None:
    probs = dropout(probs)
  sow = sow or (lambda *_: None)
  if lam is None:
    sow("intermediates", "attn", probs)
    return _values(probs, repeat_heads(value, heads))
  lam = _pairs_layout(lam)
  batch, _, tokens, keys = probs.shape
  pairs = probs.reshape(batch, heads // 2, 2, tokens, keys)
  diff = _mix(probs, lam)
  sow("intermediates", "attn1", pairs[:, :, 0])
  sow("intermediates", "attn2", pairs[:, :, 1])
  sow("intermediates", "lambda", lam if jnp.ndim(lam) == 0 else lam[..., 0])
  sow("intermediates", "diff", diff)
  return _values(diff, value).astype(jnp.float32)


def batch_chunked(fn, *args, bytes_per_example: int, chunk_bytes: int):
  """fn(*args), args batched on axis 0; over batch chunks if one batch is over `chunk_bytes`.

  Bounds the transient [B, N, T, S] tensors of the XLA path. Chunk c holds
  examples c, c + n, c + 2n, ... (a strided split), so the leading batch axis,
  the one sharded over devices, stays leading and whole.
  """
  batch = args[0].shape[0]
  chunks = next(n for n in range(1, batch + 1)
                if batch % n == 0 and (batch // n) * bytes_per_example <= chunk_bytes
                or n == batch)
  if chunks == 1:
    return fn(*args)
  split = lambda x: jnp.moveaxis(x.reshape(batch // chunks, chunks, *x.shape[1:]), 1, 0)
  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in args))
  return jnp.moveaxis(out, 0, 1).reshape(batch, *out.shape[2:])


def _xla_attention(query, key, value, scale, lam, chunk_bytes):
  batch, tokens, heads, _ = query.shape
  key = repeat_heads(key, heads)
  if lam is None:
    value = repeat_heads(value, heads)
  lam = _pairs_layout(lam)
  sizes = dict(bytes_per_example=4 * heads * tokens * key.shape[1], chunk_bytes=chunk_bytes)
  if lam is not None and jnp.ndim(lam):  # per token: chunked with the batch
    out = batch_chunked(functools.partial(_flash, scale=scale), query, key, value, lam, **sizes)
  else:
    out = batch_chunked(lambda q, k, v: _flash(q, k, v, lam, scale), query, key, value, **sizes)
  return out if lam is not None else out.astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(query, key, value, lam, scale):
  """_values(_mix(A, lam), v) with equal q/k heads, float32, and a flash-style backward pass.

  Autodiff of the plain form keeps several [B, N, T, S] tensors per layer; this
  keeps q, k, v, lambda and the log-sum-exp, and recomputes A once in the
  backward pass.
  """
  return _flash_fwd(query, key, value, lam, scale)[0]


def _flash_probs(query, key, scale, log_total=None):
  logits = _logits(query, key, scale)
  if log_total is None:
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return unnormalised / total, peak + jnp.log(total)
  return jnp.exp(logits - log_total), log_total


def _flash_fwd(query, key, value, lam, scale):
  probs, log_total = _flash_probs(query, key, scale)
  out = _values(_mix(probs, lam), value, preferred_element_type=jnp.float32)
  return out, (query, key, value, lam, log_total)


def _flash_bwd(scale, residuals, dout):
  query, key, value, lam, log_total = residuals
  probs, _ = _flash_probs(query, key, scale, log_total)
  dout = dout.astype(value.dtype)
  dvalue = jnp.einsum("bmts,btmd->bsmd", _mix(probs, lam).astype(value.dtype), dout,
                      preferred_element_type=jnp.float32)
  dweights = jnp.einsum("btmd,bsmd->bmts", dout, value, preferred_element_type=jnp.float32)
  dlam = None
  if lam is None:
    dprobs = dweights
  else:
    second = probs.reshape(dweights.shape[:2] + (2,) + dweights.shape[2:])[:, :, 1]
    dlam = -dweights * second
    dlam = (jnp.sum(dlam) if jnp.ndim(lam) == 0 else jnp.sum(dlam, -1, keepdims=True))
    dlam = dlam.astype(lam.dtype)
    dprobs = jnp.stack([dweights, -lam * dweights], axis=2).reshape(probs.shape)
  dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True)) * scale
  dlogits = dlogits.astype(query.dtype)
  dquery = jnp.einsum("bnts,bsnh->btnh", dlogits, key, preferred_element_type=jnp.float32)
  dkey = jnp.einsum("bnts,btnh->bsnh", dlogits, query, preferred_element_type=jnp.float32)
  return dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), dlam


_flash.defvjp(_flash_fwd, _flash_bwd)


def differential_cudnn(query, key, value, lam, scale: float, *,
                       implementation: str | None = "cudnn") -> jax.Array:
  """The 'cudnn' path: `jax.nn.dot_product_attention`, one call for either form.

  Differential: that API needs v heads of q's size and one v head per k head, so
  q and k are zero-padded to h_v (q.k unchanged, so `scale` is passed as given)
  and v repeated to k's heads; head 2h then gives A_{2h} v_h and head 2h+1
  A_{2h+1} v_h, each softmax computed once. Returns float32 there.
  `implementation='xla'` runs the same form off the GPU (the tests).
  """
  if lam is None:
    return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                        implementation=implementation)
  batch, tokens, pairs, value_size = value.shape
  pad = [(0, 0)] * 3 + [(0, value_size - query.shape[-1])]
  both = jax.nn.dot_product_attention(
      jnp.pad(query, pad), jnp.pad(key, pad), repeat_heads(value, key.shape[2]), scale=scale,
      implementation=implementation)
  both = both.reshape(batch, tokens, pairs, 2, value_size).astype(jnp.float32)
  lam = lam if jnp.ndim(lam) == 0 else lam[..., None]
  return both[..., 0, :] - lam * both[..., 1, :]
