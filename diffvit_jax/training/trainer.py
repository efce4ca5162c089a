"""What a run computes with, built from the config: model, attention path, state, jitted steps.

No IO and no TensorFlow, so that the train loop, `--mode eval`, the benchmark
and the GPU check build exactly the same thing.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffvit_jax import cpu_runtime, models, targets
from diffvit_jax.models import attention_impl, precision, stats
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
  """Shapes and dtypes of a training batch as the input pipeline gives it (uint8 pixels:
  the steps normalise on the device); the one place that says what a batch looks like."""
  size = config.data.image_size
  return {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8),
          "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}


def _model_and_init(config, mesh: Mesh, attention, total_steps: int,
                    num_train_examples: int | None):
  """(the model on `attention`'s path, the jitted rng -> TrainState replicated over `mesh`)."""
  # The CPU's Dense weight-gradient form (model.cpu_dense_grad), from outside the model.
  model = models.build_model(config.model, attention).clone(
      dot_general=cpu_runtime.model_dot_general(config.model, attention.backend))
  tx = optim.create_optimizer(config.train, total_steps, num_train_examples=num_train_examples)
  init = jax.jit(lambda rng: steps.create_train_state(rng, model, config.data.image_size, tx),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
  return model, init


@dataclasses.dataclass
class CompiledStep:
  """The train step compiled for a mesh, and what decided its form (one device's view)."""

  attention: attention_impl.Resolved
  model: models.ViT
  memory_plan: memory.MemoryPlan
  train_step: Any  # compiled (state, batch) -> (state, TrainMetrics)
  init: Any  # jitted rng -> TrainState, replicated over the mesh


def compile_train_step(config, mesh: Mesh, total_steps: int, *,
                       num_train_examples: int | None = None,
                       target: "targets.Target | None" = None) -> CompiledStep:
  """Resolves the attention path, then compiles the train step the memory plan chooses.

  The one compile path: training, `describe --memory`, the sweep's plan and the deviceless
  GPU rehearsal all compile here. With `target` (a GPU of diffvit_jax/targets/, `mesh` over
  its abstract devices) the rules, the memory and the compile options are that GPU's;
  otherwise the mesh's first device's.
  """
  first = mesh.devices.flat[0]
  device = target.device_info if target else attention_impl.DeviceInfo.of(first)
  memory_of_device = memory.device_memory(first, config.train)  # train.device_memory_gib wins
  if target and not config.train.device_memory_gib:
    memory_of_device = target.device_memory()
  options = targets.DEVICELESS_OPTIONS if target else None
  attention = attention_impl.resolve(
      config.model, device=device, tokens=stats.num_tokens(config.model, config.data.image_size))
  model, init = _model_and_init(config, mesh, attention, total_steps, num_train_examples)
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.train.seed))
  batch = batch_spec(config, config.train.batch_size)

  def compile_step(microbatches: int):
    train = steps.jit_steps(config, mesh, total_steps, num_train_examples=num_train_examples,
                            microbatches=microbatches)[0]
    with attention_impl.jax_capability(device.compute_capability):
      return train.lower(abstract_state, batch).compile(compiler_options=options)

  per_device = config.train.batch_size // mesh.size
  plan, train_step = memory.plan(
      config, per_device, memory_of_device, compile_step, platform=device.platform,
      batch_bytes=memory.tree_bytes(batch_spec(config, per_device)))
  return CompiledStep(attention=attention, model=model, memory_plan=plan,
                      train_step=train_step, init=init)


def build(config, mesh: Mesh, total_steps: int, *, num_train_examples: int | None = None,
          for_training: bool = True) -> Trainer:
  """The compiled train step (`compile_train_step`), the eval step and the initial state.

  `num_train_examples` (the training set's size) turns `train.warmup_epochs` into steps.
  `for_training=False` (evaluation only) compiles no train step and plans no memory.
  """
  if for_training:
    step = compile_train_step(config, mesh, total_steps, num_train_examples=num_train_examples)
    attention, model, plan, train_step, init = (step.attention, step.model, step.memory_plan,
                                                step.train_step, step.init)
  else:
    # The training rules (tokens given), so evaluation runs the path training ran.
    attention = attention_impl.resolve(
        config.model, tokens=stats.num_tokens(config.model, config.data.image_size))
    model, init = _model_and_init(config, mesh, attention, total_steps, num_train_examples)
    plan, train_step = None, None
  eval_step = steps.jit_steps(config, mesh, total_steps,
                              num_train_examples=num_train_examples)[1]
  return Trainer(mesh=mesh, attention=attention, precision=precision.policy(config.model),
                 memory_plan=plan, cpu_runtime=cpu_runtime.describe(model), model=model,
                 total_steps=total_steps, state=init(jax.random.PRNGKey(config.train.seed)),
                 train_step=train_step, eval_step=eval_step)
