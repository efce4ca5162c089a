"""What a run computes with, built from the config: model, attention path, state, jitted steps.

No IO and no TensorFlow, so that the train loop, `--mode eval`, the benchmark
and the GPU check build exactly the same thing.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffvit_jax import cpu_runtime, models
from diffvit_jax.models import attention_impl, precision
from diffvit_jax.training import memory, optim, steps


@dataclasses.dataclass
class Trainer:
  mesh: Mesh
  attention: attention_impl.Resolved  # the attention path that runs (run_info 'attention')
  precision: precision.Policy  # models/precision.py's policy of this model (run_info 'precision')
  memory_plan: memory.MemoryPlan | None  # run_info 'memory_plan'; None when built for eval
  cpu_runtime: dict  # what of cpu_runtime applies to these steps (run_info 'cpu_runtime')
  model: models.ViT
  total_steps: int
  state: steps.TrainState
  train_step: Any  # compiled (state, batch) -> (state, TrainMetrics); None when built for eval
  eval_step: Any  # jitted (state, batch) -> EvalMetrics


def batch_spec(config, global_batch: int) -> dict:
  """Shapes of a training batch as the input pipeline gives it."""
  size = config.data.image_size
  return {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}


def build(config, mesh: Mesh, total_steps: int, *, num_train_examples: int | None = None,
          for_training: bool = True) -> Trainer:
  """Resolves the attention path (a ConfigError if it cannot run here), plans memory, jits.

  `num_train_examples` (the training set's size) turns `train.warmup_epochs` into steps.
  The memory plan compiles the train step for this mesh before any state is allocated;
  `for_training=False` (evaluation only) skips both.
  """
  attention = attention_impl.resolve(config.model)
  # The CPU's Dense weight-gradient form (model.cpu_dense_grad), from outside the model.
  model = models.build_model(config.model, attention).clone(
      dot_general=cpu_runtime.model_dot_general(config.model, attention.backend))
  tx = optim.create_optimizer(config.train, total_steps, num_train_examples=num_train_examples)
  replicated = NamedSharding(mesh, PartitionSpec())
  init = jax.jit(lambda rng: steps.create_train_state(rng, model, config.data.image_size, tx),
                 out_shardings=replicated)
  rng = jax.random.PRNGKey(config.train.seed)
  abstract_state = jax.eval_shape(init, rng)
  batch = batch_spec(config, config.train.batch_size)
  train_step, plan = None, None
  eval_step = steps.jit_steps(config, mesh, total_steps,
                              num_train_examples=num_train_examples)[1]

  def compile_step(microbatches: int):
    train = steps.jit_steps(config, mesh, total_steps, num_train_examples=num_train_examples,
                            microbatches=microbatches)[0]
    return train.lower(abstract_state, batch).compile()

  if for_training:  # The compiled step the plan chose is the one that trains.
    plan, train_step = memory.plan(config, config.train.batch_size // mesh.size,
                                   mesh.devices.flat[0], compile_step)
  return Trainer(mesh=mesh, attention=attention, precision=precision.policy(config.model),
                 memory_plan=plan, cpu_runtime=cpu_runtime.describe(model), model=model,
                 total_steps=total_steps, state=init(rng), train_step=train_step,
                 eval_step=eval_step)
