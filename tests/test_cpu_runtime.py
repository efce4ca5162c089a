"""The CPU runtime: the bound on train steps in flight, and the Dense product's CPU form."""

import jax
import jax.numpy as jnp
import pytest

from diffvit_jax import cpu_runtime


class FakeStepOutput:
  def __init__(self, name, log):
    self.name, self.log = name, log

  def block_until_ready(self):
    self.log.append(self.name)
    return self


@pytest.mark.parametrize("limit, waited", [
    (None, []),  # no bound: never waits
    (0, ["s0", "s1", "s2", "s3"]),  # waits for each step right after dispatching it
    (2, ["s0", "s1"]),  # keeps the two newest unfinished
])
def test_step_queue_waits_for_the_oldest_steps(limit, waited):
  log = []
  queue = cpu_runtime.StepQueue(limit)
  for i in range(4):
    queue.push(FakeStepOutput(f"s{i}", log))
  assert log == waited


def test_accelerators_keep_a_bounded_queue_of_steps():
  # A host-side wait on the step of k steps ago: 2-3 keep the device fed, and the memory
  # plan counts that many queued batches (training/memory.py).
  assert 2 <= cpu_runtime.STEPS_IN_FLIGHT <= 3
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    assert cpu_runtime.max_steps_in_flight(platform) == cpu_runtime.STEPS_IN_FLIGHT
  assert cpu_runtime.max_steps_in_flight("cpu") == 0


def test_cpu_waits_for_every_step():
  # On XLA:CPU each queued step holds its own temporaries (RESULTS.md: 3.6x the memory).
  assert jax.default_backend() == "cpu"
  assert cpu_runtime.max_steps_in_flight() == 0


def _normal(seed, *shape):
  import numpy as np

  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


DENSE = lambda ndim: (((ndim - 1,), (0,)), ((), ()))


@pytest.mark.parametrize("x_shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
def test_dense_product_values_and_gradients_are_dot_generals(x_shape):
  import numpy as np

  x, w = _normal(0, *x_shape), _normal(1, 12, 9)
  cotangent = _normal(2, *x_shape[:-1], 9)
  loss = lambda dot: lambda x, w: jnp.sum(dot(x, w, DENSE(x.ndim)) * cotangent)
  got = jax.jit(jax.value_and_grad(loss(cpu_runtime.dense_dot_general), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1)))(x, w)
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)


def _uses_the_cpu_form(fn, *args) -> bool:
  return "custom_vjp" in str(jax.make_jaxpr(jax.grad(fn))(*args))


def test_dense_layers_take_the_cpu_form_on_the_cpu_when_the_config_says():
  from diffvit_jax import config_lib
  from diffvit_jax.models import build_model
  from diffvit_jax.models.vit import MlpBlock

  x = _normal(0, 2, 3, 4)
  for dot_general, expected in ((cpu_runtime.dense_dot_general, True), (None, False)):
    block = MlpBlock(8, dot_general=dot_general)
    params = block.init(jax.random.PRNGKey(0), x)
    assert _uses_the_cpu_form(lambda p, b=block: b.apply(p, x).sum(), params) == expected
  config = config_lib.model_config(width=32, depth=1, num_heads=2, mlp_dim=64)
  assert build_model(config, "einsum").dot_general is None  # the model's layers are plain
  model = build_model(config, "einsum").clone(
      dot_general=cpu_runtime.model_dot_general(config, "cpu"))
  assert model.dot_general is cpu_runtime.dense_dot_general
  assert cpu_runtime.describe(model)["dense_weight_gradient"] == "from transposed x"
  config.cpu_dense_grad = False
  assert cpu_runtime.model_dot_general(config, "cpu") is None
  assert cpu_runtime.describe(build_model(config, "einsum"))["dense_weight_gradient"] == "autodiff"
  assert cpu_runtime.model_dot_general(config_lib.model_config(), "gpu") is None


def test_other_contractions_are_left_to_dot_general():
  a, b = _normal(0, 2, 6, 8), _normal(1, 2, 8, 4)
  batched = (((2,), (1,)), ((0,), (0,)))  # not a Dense product
  loss = lambda b: jnp.sum(cpu_runtime.dense_dot_general(a, b, batched))
  assert not _uses_the_cpu_form(loss, b)


def test_core_shares_are_disjoint_and_a_process_pins_itself_to_its_share():
  import os
  import subprocess
  import sys

  cores = sorted(os.sched_getaffinity(0))
  shares = cpu_runtime.cpu_shares(2)
  if len(cores) >= 2:
    assert sorted(shares[0] + shares[1]) == cores and not set(shares[0]) & set(shares[1])
  else:
    assert shares == [(), ()]  # fewer cores than shares: no pinning
  assert cpu_runtime.cpu_shares(len(cores) + 1) == [()] * (len(cores) + 1)
  script = ("import os; from diffvit_jax import cpu_runtime; "
            "print(cpu_runtime.apply_cpu_defaults()['cores'], sorted(os.sched_getaffinity(0)))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{cpu_runtime.CPU_SHARE_ENV: "1/2"})
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       check=True).stdout.split("[", 1)
  if len(cores) >= 2:
    assert out[0].strip() == str(shares[1]) and "[" + out[1].strip() == str(list(shares[1]))
  env[cpu_runtime.CPU_SHARE_ENV] = "2/2"
  bad = subprocess.run([sys.executable, "-m", "diffvit_jax.main", "--config",
                        "configs/digits.py", "--workdir", "/nonexistent"], env=env,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  assert bad.returncode != 0 and "DIFFVIT_CPU_SHARE='2/2'" in bad.stderr
  assert "Traceback" not in bad.stderr
