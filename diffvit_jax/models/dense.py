"""A Dense product whose weight gradient XLA:CPU runs in YNNPACK rather than Eigen.

Autodiff of y = x W ([..., K] x [K, N]) gives dW = x^T dy, which XLA folds into
one dot contracting dimension 0 of both operands. XLA:CPU's YNNPACK fusion
does not take that form, so every weight gradient (a third of a ViT step's
matmul FLOPs) ran in Eigen: 72 against 93 GFLOP/s single-threaded for the
v2-protocol 10m model. Computing x^T behind an optimization barrier keeps it a
plain [K, M] x [M, N] product, which YNNPACK runs; the transpose is one copy
of x. Whole v2 ViT 10m step on 2 cores: 10.90 -> 10.72 s (benchmarks/RESULTS.md).
Other backends, and other contractions, use `lax.dot_general` unchanged.
"""

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(residuals, dy):
  x, w = residuals
  dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dw = jnp.dot(lax.optimization_barrier(rows(x).T), rows(dy))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`; see the module docstring."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if (jax.default_backend() == "cpu" and rhs.ndim == 2 and not lhs_batch
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and precision is None and preferred_element_type is None and not kwargs
      and lhs.dtype == rhs.dtype):
    return _dense(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
