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
- 'fused': no probability tensor kept for the backward pass. On an NVIDIA
  GPU with 16-bit activations, cuDNN's flash attention through
  `jax.nn.dot_product_attention(implementation='cudnn')` (jax 0.10's
  implementation=None always means XLA); on a single CPU device with float32
  activations, the C++ kernel of `diffvit_jax.kernels.cpu_attention` (all
  three kinds; XLA:CPU has no fused attention); elsewhere `xla_attention` /
  `differential_xla_attention`: XLA ops with a flash-attention-style custom
  backward pass. For DifferentialAttention, cuDNN needs equal head sizes, so
  it runs as two calls with v split into halves ('split_v'); the CPU kernel
  and the XLA form apply (A1 - lambda A2) to v once, half the
  probability-value work (`differential_form`). No attention-probability
  dropout: a training step with attn_dropout > 0 takes the einsum path instead.
- 'einsum': explicit logits, float32 softmax and probabilities, plain
  autodiff; it is the only path that `sow`s the attention maps into
  'intermediates' (a no-op unless that collection is mutable, see
  `models.analysis.attention_maps`).
Speeds of the alternatives are in benchmarks/RESULTS.md.

Params stay float32, activations are in `dtype`; logits, softmax and lambda
are float32.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffvit_jax.kernels import cpu_attention
from diffvit_jax.models.dense import dense_dot_general
from diffvit_jax.models.dropout import Dropout
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
                  bias_init=nn.initializers.zeros, dot_general=dense_dot_general, name=name)


def attention_probs(query: jax.Array, key: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) in float32. query [B,T,N,h], key [B,S,N,h] -> [B,N,T,S]."""
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)


def cudnn_usable(dtype, head_dim: int) -> bool:
  """Whether `jax.nn.dot_product_attention` can take cuDNN's fused kernel here.

  jax 0.10's implementation=None always means XLA (einsum, softmax, einsum),
  so cuDNN flash attention must be asked for: on an NVIDIA GPU, for 16-bit
  inputs and head sizes that are multiples of 8 up to 128 (its constraints).
  """
  return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


# Without cuDNN or the CPU kernel, attention is XLA ops: [B, N, T, S] float32 logits and
# probabilities are materialised (425 MB per layer for the v2 protocol's 576
# tokens at batch 32). `xla_attention` and `differential_xla_attention` keep
# none of them for the backward pass (autodiff of the plain formulation kept
# 16.5 GB for that step); to bound the transient ones too, batches whose
# probabilities exceed `xla_attention_chunk_bytes()` run in chunks (`lax.map`).
# Chunks cost time on the CPU (+13% of the v2 step with cache-sized ones, +2%
# with two 256 MB ones, which halve the step's temporaries from 14 to 7.6 GB),
# so the threshold only guards memory (benchmarks/RESULTS.md).
XLA_ATTENTION_CHUNK_BYTES: int | None = None  # overrides the default below; tests, benchmarks


def xla_attention_chunk_bytes() -> int:
  """Largest float32 probability tensor the XLA attention computes in one go."""
  if XLA_ATTENTION_CHUNK_BYTES is not None:
    return XLA_ATTENTION_CHUNK_BYTES
  return 2**28 if jax.default_backend() == "cpu" else 2**30


def batch_chunked(fn, *args, bytes_per_example: int):
  """fn(*args), args batched on axis 0; over batch chunks if one batch is over budget.

  Chunk c holds examples c, c + n, c + 2n, ... (a strided split), so the
  leading batch axis, the one sharded over devices, stays leading and whole.
  """
  budget = xla_attention_chunk_bytes()
  batch = args[0].shape[0]
  chunks = next(n for n in range(1, batch + 1)
                if batch % n == 0 and (batch // n) * bytes_per_example <= budget or n == batch)
  if chunks == 1:
    return fn(*args)
  split = lambda x: jnp.moveaxis(x.reshape(batch // chunks, chunks, *x.shape[1:]), 1, 0)
  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in args))
  return jnp.moveaxis(out, 0, 1).reshape(batch, *out.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v with a flash-attention-style backward pass; [B,T,N,h] layouts.

  Same function as `jax.nn.dot_product_attention(implementation='xla')`
  (float32 logits and softmax), but autodiff of that keeps several [B,N,T,S]
  tensors per layer and spends extra passes over them; this keeps only the
  output and the log-sum-exp, recomputes the probabilities once in the
  backward pass and gets the softmax's row term from out . dout (as
  FlashAttention does). value may have another head size than query and key.
  """
  return _xla_attention_fwd(query, key, value, scale)[0]


def _xla_attention_fwd(query, key, value, scale):
  logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32) * scale
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)  # [B,N,T,1]
  out = jnp.einsum("bnts,bsnh->btnh", unnormalised.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  out = (out / jnp.transpose(total, (0, 2, 1, 3))).astype(value.dtype)
  return out, (query, key, value, out, peak + jnp.log(total))


def _xla_attention_bwd(scale, residuals, dout):
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


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def differential_xla_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                               lam: jax.Array, scale: float) -> jax.Array:
  """(A1 - lam A2) v with a flash-style backward pass; float32 [B,T,H,2d].

  query/key [B,T,2H,d] (heads 2h, 2h+1 form pair h), value [B,T,H,2d]. The
  probability-value product is done once, on the difference (half the work of
  two attention calls with v), and the backward pass keeps only q, k, v and
  the log-sum-exp of each softmax, as `xla_attention` does.
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


differential_xla_attention.defvjp(_differential_fwd, _differential_bwd)

def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    scale: float) -> jax.Array:
  """`jax.nn.dot_product_attention`; query [B,T,N,h], key/value [B,S,K,h] -> [B,T,N,h].

  K may divide N (grouped queries): query head n then uses key/value head n // (N // K).
  cuDNN where `cudnn_usable` (a configuration cuDNN turns down at trace
  time, e.g. with an old cuDNN, falls back); the CPU kernel where
  `cpu_attention.usable`; else XLA, batch-chunked.
  """
  if query.shape[-1] == value.shape[-1] and cudnn_usable(query.dtype, query.shape[-1]):
    try:
      return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                          implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError):
      pass
  if cpu_attention.usable(query, key, value):
    return cpu_attention.attention(query, key, value, jnp.zeros((), jnp.float32), scale, 1)
  groups = query.shape[2] // key.shape[2]
  if groups > 1:  # grouped queries: key/value head n // groups for query head n
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
  _, tokens, heads, _ = query.shape
  return batch_chunked(functools.partial(xla_attention, scale=scale), query, key, value,
                       bytes_per_example=4 * heads * tokens * key.shape[1])


# How DifferentialAttention's 'fused' impl computes (A1 - lambda A2) v (measured in
# benchmarks/RESULTS.md, "Differential attention: formulations"):
#   'split_v'   two `fused_attention` calls, one per half of v, every head of
#               size d: what cuDNN's flash attention (equal head sizes) can run.
#   'zero_pad'  one call with q and k zero-padded to 2d and v repeated per pair:
#               exact, but twice the q.k work and not flash-friendly.
#   'einsum'    plain autodiff of probabilities, (A1 - lambda A2), one PV product:
#               keeps [B, 2H, T, S] tensors for the backward pass.
#   'xla'       `differential_fused`: the 'einsum' arithmetic (half the PV work
#               of 'split_v') with a flash-style backward pass; the CPU kernel
#               (num_maps=2) where it runs, else `differential_xla_attention`.
# None picks 'split_v' where cuDNN runs (GPU, 16-bit) and 'xla' elsewhere.
DIFFERENTIAL_FUSED_FORM: str | None = None
DIFFERENTIAL_FORMS = ("split_v", "zero_pad", "einsum", "xla")


def differential_form(impl: str, attn_dropout_active: bool, dtype, head_dim: int) -> str:
  """The formulation DifferentialAttention uses (see DIFFERENTIAL_FUSED_FORM)."""
  if impl == "einsum" or attn_dropout_active:  # fused kernels have no probability dropout
    return "einsum"
  if DIFFERENTIAL_FUSED_FORM is not None:
    return DIFFERENTIAL_FUSED_FORM
  return "split_v" if cudnn_usable(dtype, head_dim) else "xla"


def differential_fused(query, key, value, lam, scale: float) -> jax.Array:
  """(A1 - lam A2) v: the CPU kernel, else `differential_xla_attention` over batch chunks.

  float32 [B,T,H,2d].
  """
  if cpu_attention.usable(query, key, value):
    return cpu_attention.attention(query, key, value, lam, scale, 2)
  _, tokens, heads, _ = query.shape
  core = lambda q, k, v: differential_xla_attention(q, k, v, lam, scale)
  return batch_chunked(core, query, key, value, bytes_per_example=4 * heads * tokens**2)


def differential_split_v(query, key, value, lam, scale: float) -> jax.Array:
  """(A1 - lam A2) v as two `fused_attention` calls at head size d; float32 [B,T,H,2d].

  query/key [B,T,2H,d], value [B,T,H,2d]. Each call takes one half of v,
  repeated for heads 2h and 2h+1, so its head 2h gives A1 v_half[h] and head
  2h+1 gives A2 v_half[h].
  """
  batch, tokens, pairs, twice_d = value.shape
  halves = []
  for half in (value[..., :twice_d // 2], value[..., twice_d // 2:]):
    both = fused_attention(query, key, jnp.repeat(half, 2, axis=2), scale)
    halves.append(both.reshape(batch, tokens, pairs, 2, twice_d // 2))
  both = jnp.concatenate(halves, axis=-1).astype(jnp.float32)
  return both[..., 0, :] - lam * both[..., 1, :]


def differential_zero_pad(query, key, value, lam, scale: float) -> jax.Array:
  """(A1 - lam A2) v as one `fused_attention` call with q and k zero-padded to 2d.

  Zero-padding leaves q.k (and, with the explicit scale, the softmax)
  unchanged, so one call computes A1 v[h] and A2 v[h] for every pair (v
  repeated for heads 2h and 2h+1).
  """
  batch, tokens, pairs, twice_d = value.shape
  pad = [(0, 0), (0, 0), (0, 0), (0, twice_d - query.shape[-1])]
  both = fused_attention(jnp.pad(query, pad), jnp.pad(key, pad), jnp.repeat(value, 2, axis=2),
                         scale)
  both = both.reshape(batch, tokens, pairs, 2, twice_d).astype(jnp.float32)
  return both[..., 0, :] - lam * both[..., 1, :]


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
      probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
      out = jnp.einsum("bnts,bsnh->btnh", probs.astype(self.dtype), v)
    else:
      out = fused_attention(q, k, v, scale)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)


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

    form = differential_form(self.impl, train and self.attn_dropout > 0, q.dtype, head_dim)
    if form == "einsum":
      probs = attention_probs(q, k, scale)  # [B, 2H, T, S]
      probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
      probs = probs.reshape(batch, pairs, 2, tokens, tokens)
      attn1, attn2 = probs[:, :, 0], probs[:, :, 1]
      diff = attn1 - lam * attn2
      self.sow("intermediates", "attn1", attn1)
      self.sow("intermediates", "attn2", attn2)
      self.sow("intermediates", "lambda", lam)
      self.sow("intermediates", "diff", diff)
      out = jnp.einsum("bhts,bshd->bthd", diff.astype(self.dtype), v).astype(jnp.float32)
    elif form == "xla":
      out = differential_fused(q, k, v, lam, scale)
    elif form == "split_v":
      out = differential_split_v(q, k, v, lam, scale)
    else:
      out = differential_zero_pad(q, k, v, lam, scale)

    if self.head_norm != "none":
      # One scale vector of size 2d shared by all heads, as timm's sub_norm.
      out = make_norm(self.head_norm, eps=HEAD_NORM_EPS, dtype=jnp.float32, name="head_norm")(out)
    out = (out * (1.0 - lambda_init(self.layer))).astype(self.dtype)
    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)


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
      both = fused_attention(q, k, v, scale).reshape(batch, tokens, pairs, 2, head_dim)
      both = both.astype(jnp.float32)
      out = (both[..., 0, :] - lam[..., None] * both[..., 1, :]).astype(self.dtype)

    out = projection(width, use_bias=True, dtype=self.dtype, name="out")(
        out.reshape(batch, tokens, width))
    return Dropout(self.dropout)(out, deterministic=not train)
