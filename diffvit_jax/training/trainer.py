"""What a run computes with, built from the config: model, attention path, state, jitted steps.

No IO and no TensorFlow, so that the train loop, `--mode eval`, the benchmark
and the GPU check build exactly the same thing.
"""

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffvit_jax import cpu_runtime, models
from diffvit_jax.models import attention_impl
from diffvit_jax.training import optim, steps


@dataclasses.dataclass
class Trainer:
  mesh: Mesh
  attention: attention_impl.Resolved  # the attention path that runs (run_info 'attention')
  cpu_runtime: dict  # what of cpu_runtime applies to these steps (run_info 'cpu_runtime')
  model: models.ViT
  total_steps: int
  state: steps.TrainState
  train_step: Any  # jitted (state, batch) -> (state, TrainMetrics)
  eval_step: Any  # jitted (state, batch) -> EvalMetrics


def build(config, mesh: Mesh, total_steps: int, *,
          num_train_examples: int | None = None) -> Trainer:
  """Resolves the attention path (a ConfigError if it cannot run here), inits, jits.

  `num_train_examples` (the training set's size) turns `train.warmup_epochs` into steps.
  """
  attention = attention_impl.resolve(config.model)
  model = models.build_model(config.model, attention)
  tx = optim.create_optimizer(config.train, total_steps, num_train_examples=num_train_examples)
  replicated = NamedSharding(mesh, PartitionSpec())
  state = jax.jit(
      lambda rng: steps.create_train_state(rng, model, config.data.image_size, tx),
      out_shardings=replicated)(jax.random.PRNGKey(config.train.seed))
  train_step, eval_step = steps.jit_steps(config, mesh, total_steps,
                                          num_train_examples=num_train_examples)
  return Trainer(mesh=mesh, attention=attention, cpu_runtime=cpu_runtime.describe(), model=model,
                 total_steps=total_steps, state=state, train_step=train_step,
                 eval_step=eval_step)
