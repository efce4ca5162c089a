"""Dropout (and drop-path) whose masks come from a keyed counter hash instead of threefry.

`flax.linen.Dropout` draws one threefry-2x32 value per element. On the CPU
that is a sizeable part of a train step with dropout (`rbg` keys are slower
still there; the timings are in benchmarks/RESULTS.md). Here each call
draws only a 64-bit seed from the module's 'dropout' stream (threefry, as
before) and the mask bits are a keyed integer hash of the element index: a
handful of fused, vectorised integer ops per element, far cheaper.

The hash is two rounds of the 'lowbias32' finaliser (good avalanche, bias
~1e-3 of an ideal hash in its author's tests), keyed by both seed words, so
masks of different calls do not repeat each other. That is ample for
dropout, whose masks only need to be independent of the data and of each
other; use jax.random for anything else. The keep probability is exact to
2^-32 and kept values are scaled by 1 / keep, as `nn.Dropout` does. The mask
depends only on (rng, shape, example index), not on how the batch is sharded:
row r of a microbatch is example `stride * r + offset` of the global batch
(`example_rows`, set by the train step), so gradient accumulation draws the
masks the whole batch would.
"""

import contextlib
import contextvars
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


# (stride, offset): row r of the tensors being dropped is example stride * r + offset.
_ROWS = contextvars.ContextVar("dropout_example_rows", default=(1, 0))


@contextlib.contextmanager
def example_rows(stride: int, offset):
  """Within this block (at trace time), row r of the batch is global example stride*r + offset.

  `offset` may be traced (a microbatch index inside `lax.scan`).
  """
  token = _ROWS.set((stride, offset))
  try:
    yield
  finally:
    _ROWS.reset(token)


def hashed_bits(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 bits of `shape`, a function of (rng, global element index) only.

  The leading axis is the batch; its rows are mapped to global examples by `example_rows`.
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  if not shape:
    return _lowbias32(_lowbias32(seed[0]) ^ seed[1])
  stride, offset = _ROWS.get()
  inner = 1
  for dim in shape[1:]:
    inner *= dim
  if shape[0] * stride * inner >= 2**32:
    raise ValueError(f"A dropout mask of {shape[0] * stride * inner} elements needs more "
                     "than 32-bit indices.")
  rows = lax.iota(jnp.uint32, shape[0]) * jnp.uint32(stride) + jnp.asarray(offset, jnp.uint32)
  within = lax.iota(jnp.uint32, inner)
  index = (rows[:, None] * jnp.uint32(inner) + within[None, :]).reshape(shape)
  return _lowbias32(_lowbias32(index + seed[0]) ^ seed[1])


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout` (same fields and call), with hashed masks.

  `broadcast_dims` share one mask value along those axes (drop-path uses
  (1, 2): one draw per example).
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = 1.0 - self.rate
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    bits = hashed_bits(self.make_rng(self.rng_collection), shape)
    # P(bits < t) = t / 2^32 = keep, up to rounding t to an integer.
    threshold = jnp.uint32(min(round(keep * 2**32), 2**32 - 1))
    mask = jnp.broadcast_to(bits < threshold, inputs.shape)
    return lax.select(mask, inputs / jnp.asarray(keep, inputs.dtype), jnp.zeros_like(inputs))
