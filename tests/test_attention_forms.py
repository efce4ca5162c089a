"""The fast attention paths and dropout agree with their plain definitions, gradients too."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax.models import attention_ops
from diffvit_jax.models.dropout import Dropout, hashed_bits

SCALE = 0.3


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def value_and_grads(fn, args, cotangent):
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cotangent),
                                    argnums=tuple(range(len(args)))))(*args)


def assert_close(got, want, tol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


def plain_attention(q, k, v):
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) * SCALE, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("kv_heads, value_size", [(4, 8), (2, 8), (4, 16)])
def test_xla_attention_matches_softmax_attention(kv_heads, value_size):
  q, k = normal(0, 3, 17, 4, 8), normal(1, 3, 17, kv_heads, 8)
  v, cotangent = normal(2, 3, 17, kv_heads, value_size), normal(3, 3, 17, 4, value_size)
  fast = lambda q, k, v: attention_ops.attention(q, k, v, scale=SCALE, impl="xla")
  assert_close(value_and_grads(fast, (q, k, v), cotangent),
               value_and_grads(plain_attention, (q, k, v), cotangent))


def plain_differential(q, k, v, lam):
  batch, tokens, pairs, _ = v.shape
  probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) * SCALE, axis=-1)
  probs = probs.reshape(batch, pairs, 2, tokens, tokens)
  return jnp.einsum("bhts,bshd->bthd", probs[:, :, 0] - lam * probs[:, :, 1], v)


def test_differential_xla_form_matches_the_formula():
  q, k, v = normal(0, 2, 17, 4, 8), normal(1, 2, 17, 4, 8), normal(2, 2, 17, 2, 16)
  lam, cotangent = jnp.float32(0.37), normal(3, 2, 17, 2, 16)
  fast = lambda q, k, v, lam: attention_ops.attention(q, k, v, scale=SCALE, impl="xla", lam=lam)
  assert_close(value_and_grads(fast, (q, k, v, lam), cotangent),
               value_and_grads(plain_differential, (q, k, v, lam), cotangent))


def plain_tokenwise(q, k, v, lam):
  """The v2 form: q heads 2h, 2h+1 share k_h, v_h; lambda [B, T, H] per token."""
  batch, tokens, pairs, _ = v.shape
  k = jnp.repeat(k, 2, axis=2)
  probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) * SCALE, axis=-1)
  probs = probs.reshape(batch, pairs, 2, tokens, tokens)
  lam = jnp.transpose(lam, (0, 2, 1))[..., None]
  return jnp.einsum("bhts,bshd->bthd", probs[:, :, 0] - lam * probs[:, :, 1], v)


@pytest.mark.parametrize("chunk_bytes", [2**30, 2 * 4 * 4 * 9 * 9])
def test_tokenwise_differential_xla_form_matches_the_formula(chunk_bytes):
  q, k, v = normal(0, 4, 9, 4, 8), normal(1, 4, 9, 2, 8), normal(2, 4, 9, 2, 8)
  lam, cotangent = jax.nn.sigmoid(normal(3, 4, 9, 2)), normal(4, 4, 9, 2, 8)
  fast = lambda q, k, v, lam: attention_ops.attention(q, k, v, scale=SCALE, impl="xla", lam=lam,
                                                      chunk_bytes=chunk_bytes)
  got = value_and_grads(fast, (q, k, v, lam), cotangent)
  assert float(jnp.abs(got[1][3]).max()) > 1e-3  # lambda gets a real gradient
  assert_close(got, value_and_grads(plain_tokenwise, (q, k, v, lam), cotangent))


@pytest.mark.parametrize("implementation", ["xla", None])
def test_differential_cudnn_form_matches_the_formula(implementation):
  # The cuDNN form (q/k zero-padded to 2d, one call) run by jax's XLA attention on the CPU.
  q, k, v = normal(0, 2, 17, 4, 8), normal(1, 2, 17, 4, 8), normal(2, 2, 17, 2, 16)
  lam, cotangent = jnp.float32(0.37), normal(3, 2, 17, 2, 16)
  form = lambda *a: attention_ops.differential_cudnn(*a, SCALE, implementation=implementation)
  assert_close(value_and_grads(form, (q, k, v, lam), cotangent),
               value_and_grads(plain_differential, (q, k, v, lam), cotangent), tol=1e-5)


def test_batch_chunks_change_nothing():
  q, k, v, cotangent = (normal(i, 6, 9, 4, 8) for i in range(4))
  attend = lambda chunk_bytes: lambda q, k, v, lam=None: attention_ops.attention(
      q, k, v, scale=SCALE, impl="xla", lam=lam, chunk_bytes=chunk_bytes)
  whole = value_and_grads(attend(2**30), (q, k, v), cotangent)
  chunked = value_and_grads(attend(2 * 4 * 4 * 9 * 9), (q, k, v), cotangent)  # 2 examples
  assert_close(chunked, whole, tol=1e-5)
  dq, dk, dv = (normal(10 + i, 6, 9, 4, 8) for i in range(3))
  lam = jnp.float32(0.2)
  args = (dq, dk, dv[:, :, :2], lam)
  want = value_and_grads(attend(2**30), args, cotangent[:, :, :2])
  got = value_and_grads(attend(3 * 4 * 4 * 9 * 9), args, cotangent[:, :, :2])
  assert_close(got, want, tol=1e-5)


def test_hashed_dropout_statistics():
  rate, shape = 0.1, (64, 65, 320)
  x = jnp.ones(shape)
  drop = lambda seed: Dropout(rate).apply({}, x, deterministic=False,
                                          rngs={"dropout": jax.random.key(seed)})
  a, b = np.asarray(jax.jit(drop)(0)), np.asarray(jax.jit(drop)(1))
  kept_a, kept_b = a != 0, b != 0
  assert abs(kept_a.mean() - 0.9) < 3e-3  # 1.3M draws: sd 2.6e-4
  np.testing.assert_allclose(a[kept_a], 1 / 0.9, rtol=1e-6)
  assert abs(np.corrcoef(kept_a.ravel(), kept_b.ravel())[0, 1]) < 0.01  # keys independent
  # Neighbouring elements and rows are not correlated either.
  assert abs(np.corrcoef(kept_a[..., :-1].ravel(), kept_a[..., 1:].ravel())[0, 1]) < 0.01
  assert abs(np.corrcoef(kept_a[:, :-1].ravel(), kept_a[:, 1:].ravel())[0, 1]) < 0.01
  np.testing.assert_array_equal(a, np.asarray(jax.jit(drop)(0)))  # a function of the key


def test_hashed_dropout_matches_nn_dropout_api():
  x = normal(0, 8, 5, 4)
  rngs = {"dropout": jax.random.key(0)}
  assert Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs) is x
  assert Dropout(0.5).apply({}, x, deterministic=True) is x
  # broadcast_dims: one draw per example (drop-path).
  out = Dropout(0.5, broadcast_dims=(1, 2)).apply({}, x, deterministic=False, rngs=rngs)
  per_example = np.asarray(out != 0).reshape(8, -1)
  assert set(per_example.all(1) | ~per_example.any(1)) == {True}
  assert 0 < per_example.all(1).sum() < 8
  # In a module it draws from the 'dropout' stream only, like nn.Dropout.
  module = nn.Sequential([lambda y: Dropout(0.5)(y, deterministic=False)])
  with pytest.raises(Exception, match="dropout"):
    module.apply({}, x)


def test_hashed_bits_cover_the_range():
  bits = np.asarray(hashed_bits(jax.random.key(3), (1 << 16,)), np.float64) / 2**32
  assert abs(bits.mean() - 0.5) < 0.01 and bits.min() < 1e-3 and bits.max() > 1 - 1e-3
