"""Attention computations shared by the attention modules, one function per path.

Every function takes [B, T, N, h] queries and [B, S, K, h] keys / values
(K divides N: query head n uses key/value head n // (N // K)) and returns
[B, T, N, h_v]. Which one runs is `config.model.attention_impl`, resolved
once per run by `models.attention_impl.resolve`; nothing here looks at the
backend or the dtype to pick another path.

- `einsum_probs`: explicit float32 probabilities (the 'einsum' path builds
  on it; it is the only path that can `sow` attention maps and drop
  probabilities).
- `xla_attention`: XLA ops with a flash-attention-style custom backward
  pass (keeps only the output and the log-sum-exp), over batch chunks whose
  float32 probabilities fit `chunk_bytes`.
- `cudnn_attention`: `jax.nn.dot_product_attention(implementation='cudnn')`,
  cuDNN's fused flash attention (NVIDIA GPUs, 16-bit, equal q/k/v head sizes).

Params stay float32, activations are in `dtype`; logits and softmax are float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax import cpu_runtime

Dtype = Any


def projection(features: int, *, use_bias: bool, dtype: Dtype, name: str) -> nn.Dense:
  """A Dense with float32 params, xavier-uniform kernel and zero bias (as timm's 'jax' init)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, dot_general=cpu_runtime.dense_dot_general,
                  name=name)


def einsum_probs(query: jax.Array, key: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) in float32. query [B,T,N,h], key [B,S,N,h] -> [B,N,T,S]."""
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)


def repeat_kv(query: jax.Array, key: jax.Array, value: jax.Array):
  """key/value with head n // groups repeated for query head n (grouped queries)."""
  groups = query.shape[2] // key.shape[2]
  if groups == 1:
    return key, value
  return jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)


def batch_chunked(fn, *args, bytes_per_example: int, chunk_bytes: int):
  """fn(*args), args batched on axis 0; over batch chunks if one batch is over `chunk_bytes`.

  Bounds the transient [B, N, T, S] tensors of the XLA path (425 MB per layer
  for the v2 protocol's 576 tokens at batch 32). Chunk c holds examples c,
  c + n, c + 2n, ... (a strided split), so the leading batch axis, the one
  sharded over devices, stays leading and whole.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_xla(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v, equal head counts, with a flash-attention-style backward pass.

  Autodiff of the plain formulation keeps several [B,N,T,S] tensors per layer;
  this keeps only the output and the log-sum-exp, recomputes the
  probabilities once in the backward pass and gets the softmax's row term
  from out . dout (as FlashAttention does). value may have another head size.
  """
  return _flash_xla_fwd(query, key, value, scale)[0]


def _flash_xla_fwd(query, key, value, scale):
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)  # [B,N,T,1]
  out = jnp.einsum("bnts,bsnh->btnh", unnormalised.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  out = (out / jnp.transpose(total, (0, 2, 1, 3))).astype(value.dtype)
  return out, (query, key, value, out, peak + jnp.log(total))


def _flash_xla_bwd(scale, residuals, dout):
  query, key, value, out, log_total = residuals
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  probs = jnp.exp(logits - log_total)
  dvalue = jnp.einsum("bnts,btnh->bsnh", probs.astype(dout.dtype), dout,
                      preferred_element_type=jnp.float32)
  dprobs = jnp.einsum("btnh,bsnh->bnts", dout, value, preferred_element_type=jnp.float32)
  # sum_s probs * dprobs = out . dout per query: [B,T,N] -> [B,N,T,1].
  row = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), dout.astype(jnp.float32))
  dlogits = (probs * (dprobs - row[..., None]) * scale).astype(query.dtype)
  dquery = jnp.einsum("bnts,bsnh->btnh", dlogits, key, preferred_element_type=jnp.float32)
  dkey = jnp.einsum("bnts,btnh->bsnh", dlogits, query, preferred_element_type=jnp.float32)
  return dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype)


_flash_xla.defvjp(_flash_xla_fwd, _flash_xla_bwd)


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float, *,
                  chunk_bytes: int) -> jax.Array:
  """The 'xla' path: flash-style custom VJP in XLA ops, batch-chunked, grouped queries allowed."""
  key, value = repeat_kv(query, key, value)
  _, tokens, heads, _ = query.shape
  return batch_chunked(functools.partial(_flash_xla, scale=scale), query, key, value,
                       bytes_per_example=4 * heads * tokens * key.shape[1],
                       chunk_bytes=chunk_bytes)


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    scale: float) -> jax.Array:
  """The 'cudnn' path: cuDNN's flash attention; its own errors propagate (never swallowed)."""
  return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")


def fused_attention(impl: str, query, key, value, scale: float, *, chunk_bytes: int):
  """softmax(q k^T * scale) v by the named fused path ('xla' or 'cudnn')."""
  if impl == "cudnn":
    return cudnn_attention(query, key, value, scale)
  if impl == "xla":
    return xla_attention(query, key, value, scale, chunk_bytes=chunk_bytes)
  raise ValueError(f"{impl!r} is not a fused attention path ('xla', 'cudnn').")
