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
  # Heads-major [B, N, T, h] (small copies): each product below is then a plain batched
  # matmul whose [T, S] operand needs no transpose.
  query, key, value = (_heads_major(x) for x in (query, key, value))
  sizes = dict(bytes_per_example=4 * heads * tokens * key.shape[2], chunk_bytes=chunk_bytes)
  if lam is None:
    out = batch_chunked(lambda q, k, v: _flash_classic(q, k, v, scale), query, key, value,
                        **sizes)
    return _heads_major(out).astype(value.dtype)
  if jnp.ndim(lam):  # per token: chunked with the batch
    out = batch_chunked(functools.partial(_flash_differential, scale=scale), query, key, value,
                        lam, **sizes)
  else:
    out = batch_chunked(lambda q, k, v: _flash_differential(q, k, v, lam, scale), query, key,
                        value, **sizes)
  return _heads_major(out)


def _heads_major(x):
  """[B, T, N, h] <-> [B, N, T, h]."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _scores(query, key):
  """q k^T, unscaled, float32: [B, N, T, h] x [B, N, S, h] -> [B, N, T, S]."""
  return jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=jnp.float32)


def _times(weights, value):
  """weights [B, M, T, S] times value [B, M, S, h] -> [B, M, T, h], float32."""
  return jnp.einsum("bmts,bmsh->bmth", weights.astype(value.dtype), value,
                    preferred_element_type=jnp.float32)


def _transposed_times(weights, rows, scale=1.0):
  """scale weights^T rows ([B, M, T, S], [B, M, T, h] -> [B, M, S, h]), float32.

  Written as (scale rows^T weights)^T: with the transposes on the small
  operands, XLA:CPU runs it in its fast dot library rather than its generic dot
  (the scale between product and transpose keeps XLA from folding them back).
  """
  rows = jnp.swapaxes(rows, 2, 3).astype(weights.dtype)
  product = jnp.einsum("bmht,bmts->bmhs", rows, weights, preferred_element_type=jnp.float32)
  return jnp.swapaxes(product * scale, 2, 3)


def _softmax_stats(scores, scale):
  """(exp(scale (s - max s)), its row sum, log-sum-exp of scale s), all float32.

  `scale` (> 0) is applied inside the exponential, so no scaled copy of the
  [B, N, T, S] scores is made.
  """
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  unnormalised = jnp.exp((scores - peak) * scale)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  return unnormalised, total, peak * scale + jnp.log(total)


def _probs(query, key, scale, log_total):
  """A = softmax(scale q k^T) again from the forward pass's log-sum-exp."""
  return jnp.exp(_scores(query, key) * scale - log_total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_classic(query, key, value, scale):
  """A v for heads-major q, k, v of equal heads, float32, with a flash-style backward pass.

  Autodiff of the plain form keeps several [B, N, T, S] tensors per layer; this
  keeps q, k, v, the output and the log-sum-exp, and recomputes A once in the
  backward pass. The forward pass normalises the [T, h] output rather than
  the [T, S] weights.
  """
  return _flash_classic_fwd(query, key, value, scale)[0]


def _flash_classic_fwd(query, key, value, scale):
  unnormalised, total, log_total = _softmax_stats(_scores(query, key), scale)
  out = _times(unnormalised, value) / total
  return out, (query, key, value, out, log_total)


def _flash_classic_bwd(scale, residuals, dout):
  query, key, value, out, log_total = residuals
  probs = _probs(query, key, scale, log_total)
  dvalue = _transposed_times(probs.astype(value.dtype), dout.astype(value.dtype))
  dprobs = jnp.einsum("bnth,bnsh->bnts", dout.astype(value.dtype), value,
                      preferred_element_type=jnp.float32)
  # sum_s dA_ts A_ts = dout_t . out_t: the softmax backward's row sums from [T, h] tensors.
  rows = jnp.sum(dout * out, axis=-1, keepdims=True)
  return _scores_backward(query, key, probs, dprobs, rows, scale) + (dvalue.astype(value.dtype),)


def _scores_backward(query, key, probs, dprobs, rows, scale):
  """(dq, dk) from the probabilities' cotangent; `rows` = sum_s dprobs * probs."""
  dscores = (probs * (dprobs - rows)).astype(query.dtype)
  dquery = jnp.einsum("bnts,bnsh->bnth", dscores, key, preferred_element_type=jnp.float32)
  dkey = _transposed_times(dscores, query, scale)
  return (dquery * scale).astype(query.dtype), dkey.astype(key.dtype)


_flash_classic.defvjp(_flash_classic_fwd, _flash_classic_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_differential(query, key, value, lam, scale):
  """(A_{2h} - lambda A_{2h+1}) v_h for heads-major q, k (2H heads) and v (H), float32.

  The flash-style backward pass of `_flash_classic`, keeping q, k, v, lambda
  and the log-sum-exp.
  """
  return _flash_differential_fwd(query, key, value, lam, scale)[0]


def _flash_differential_fwd(query, key, value, lam, scale):
  unnormalised, total, log_total = _softmax_stats(_scores(query, key), scale)
  out = _times(_mix(unnormalised / total, lam), value)
  return out, (query, key, value, lam, log_total)


def _flash_differential_bwd(scale, residuals, dout):
  query, key, value, lam, log_total = residuals
  probs = _probs(query, key, scale, log_total)
  dout = dout.astype(value.dtype)
  dvalue = _transposed_times(_mix(probs, lam).astype(value.dtype), dout)
  dweights = jnp.einsum("bmth,bmsh->bmts", dout, value, preferred_element_type=jnp.float32)
  second = probs.reshape(dweights.shape[:2] + (2,) + dweights.shape[2:])[:, :, 1]
  dlam = -dweights * second
  dlam = (jnp.sum(dlam) if jnp.ndim(lam) == 0 else jnp.sum(dlam, -1, keepdims=True))
  # dA_{2h} = dW_h, dA_{2h+1} = -lambda dW_h: a broadcast product XLA fuses into its users.
  lam_rows = lam if jnp.ndim(lam) else jnp.reshape(lam, (1, 1))  # [..., T or 1, 1]
  signs = jnp.stack([jnp.ones_like(lam_rows), -lam_rows], axis=-3)
  dprobs = (dweights[:, :, None] * signs).reshape(probs.shape)
  rows = jnp.sum(dprobs * probs, axis=-1, keepdims=True)
  dquery, dkey = _scores_backward(query, key, probs, dprobs, rows, scale)
  return dquery, dkey, dvalue.astype(value.dtype), dlam.astype(lam.dtype)


_flash_differential.defvjp(_flash_differential_fwd, _flash_differential_bwd)


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
