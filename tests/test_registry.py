"""A new attention kind is one linen module plus one registry entry, and nothing else.

The toy kind below is defined here only; it goes through the config schema and its
validation, `build_model`, the parameter and FLOP counts, a train step, the report's
labels and the GPU check's agreement measurement of the dry run.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import build_model, registry, stats
from diffvit_jax.models.attention_ops import attention, projection
from diffvit_jax.reporting import plots, runs
from diffvit_jax.tools import gpu_check, gpu_measure
from diffvit_jax.training import optim, steps


class ToyAttention(nn.Module):
  """Multi-head attention with a fixed temperature on the logits: softmax(q k^T / (t sqrt(h)))."""

  num_heads: int
  temperature: float  # the kind's own config field, through `layer_fields`
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  impl: str = "einsum"
  chunk_bytes: int = 2**30
  dtype: Any = jnp.float32
  dot_general: Callable | None = None

  @nn.compact
  def __call__(self, x, *, train=False):
    batch, tokens, width = x.shape
    size = width // self.num_heads
    dense = lambda name: projection(width, use_bias=self.qkv_bias, dtype=self.dtype,
                                    dot_general=self.dot_general, name=name)
    q, k, v = (dense(name)(x).reshape(batch, tokens, self.num_heads, size)
               for name in ("query", "key", "value"))
    out = attention(q, k, v, scale=size**-0.5 / self.temperature, impl=self.impl,
                    chunk_bytes=self.chunk_bytes, sow=self.sow)
    return dense("out")(out.reshape(batch, tokens, width))


TOY = registry.AttentionKind(
    label="Toy", module=ToyAttention, differential=False, qk_width_factor=1,
    fused_head_dims=lambda m: (m.width // m.num_heads,) * 2,
    layer_fields=lambda fields, layer: dict(temperature=fields["toy_temperature"]),
    config_fields={"toy_temperature": (2.0, (1.0, 2.0, 4.0))})


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(registry.ARCHS, "toy", TOY)


def test_a_toy_kind_configures_builds_counts_trains_reports_and_agrees(toy):
  config = config_lib.base_config()
  config.model = config_lib.model_config(arch="toy", width=32, depth=1, num_heads=4, mlp_dim=64,
                                         num_classes=10)
  config.data.update(source="digits", image_size=16)
  config.train.update(batch_size=8, eval_batch_size=8, steps=2)
  assert config.model.toy_temperature == 2.0  # the entry's field, in the shared schema
  config_lib.validate(config, num_devices=1)
  bad = config.copy_and_resolve_references()
  bad.model.toy_temperature = 3.0
  with pytest.raises(ConfigError, match="toy_temperature"):
    config_lib.validate(bad, num_devices=1)

  # Sizes: the toy kind has the classic ViT's parameter tree.
  assert stats.extra_params_vs_baseline(config.model, 16) == 0
  assert stats.gflops_per_image(config.model, 16) > 0

  # One train step.
  model = build_model(config.model, "einsum")
  assert model.arch_fields == {"toy_temperature": 2.0}
  tx = optim.create_optimizer(config.train, 2)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, 16, tx)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8))}
  step = jax.jit(functools.partial(steps.train_step, config=config,
                                   learning_rate_fn=optim.learning_rate_schedule(config.train, 2)))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics.compute()["loss"]))
  assert not np.allclose(new_state.params["head"]["kernel"], state.params["head"]["kernel"])

  # The report's labels and colours.
  group = runs.Group(protocol="v2", size="10m", arch="toy", name="toy_10m,v2", runs=[])
  assert group.label == "Toy" and group.differential is False
  assert plots._color(group, 3) == "C3"

  # The GPU check's agreement measurement of one arch, on the dry run's tiny model.
  dry = gpu_measure.sweep_config("toy_10m,v2", gpu_check.DRY_RUN.overrides).model
  reference_config = dry.copy_and_resolve_references()
  reference_config.dtype = "float32"
  inputs = gpu_measure.agreement_inputs(reference_config, 32, 2)
  reference = gpu_measure.logits_and_grads(reference_config, "einsum", *inputs)
  record = gpu_check.compare(dry, "xla", inputs, reference)
  assert record["within_tolerance"], record
