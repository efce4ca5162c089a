"""The Dense product with the YNNPACK-friendly weight gradient equals lax.dot_general's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax.models.dense import dense_dot_general


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("x_shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
def test_values_and_gradients_match_dot_general(x_shape):
  x, w = normal(0, *x_shape), normal(1, 12, 9)
  cotangent = normal(2, *x_shape[:-1], 9)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  loss = lambda dot: lambda x, w: jnp.sum(dot(x, w, dims) * cotangent)
  got = jax.jit(jax.value_and_grad(loss(dense_dot_general), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1)))(x, w)
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)


def test_weight_gradient_takes_the_materialised_transpose():
  x, w = normal(0, 6, 8), normal(1, 8, 4)
  dims = (((1,), (0,)), ((), ()))
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(dense_dot_general(x, w, dims))))(w)
  assert "optimization_barrier" in str(jaxpr)


def test_other_contractions_are_left_to_dot_general():
  a, b = normal(0, 2, 6, 8), normal(1, 2, 8, 4)
  dims = (((2,), (1,)), ((0,), (0,)))  # batched: not a Dense product
  np.testing.assert_allclose(dense_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims),
                             rtol=1e-6)
  jaxpr = jax.make_jaxpr(jax.grad(lambda b: jnp.sum(dense_dot_general(a, b, dims))))(b)
  assert "optimization_barrier" not in str(jaxpr)
