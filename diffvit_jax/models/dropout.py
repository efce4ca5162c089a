"""Dropout (and drop-path) whose masks come from a keyed counter hash instead of threefry.

Each call draws a 64-bit seed from the module's 'dropout' stream and the mask
bits are two rounds of the 'lowbias32' integer hash of (seed, element index):
a few fused integer ops per element, far cheaper than `nn.Dropout`'s threefry
draw per element on the CPU (timings in benchmarks/RESULTS.md). Ample for
dropout, whose masks only need independence from the data and each other. The
mask depends only on (rng, shape, global example index): row r of a microbatch
is example `stride * r + offset` (`example_rows`, set by the train step), so
gradient accumulation draws the masks the whole batch would.
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
