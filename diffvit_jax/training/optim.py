"""Learning-rate schedule and optimizer: exactly what the (validated) config says.

The schedule is built from `config.train` and the training set's size alone.
Recipes are stated per epoch and at a reference batch (`train.warmup_epochs`,
`train.learning_rate` at `train.lr_reference_batch`), so overriding
`train.batch_size` keeps the recipe: `derive_recipe` turns them into the steps
and peak learning rate of this run.
"""

import dataclasses
import math

import jax
import optax
from flax import traverse_util

from diffvit_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a run's `config.train` comes to on its data set and global batch."""

  total_steps: int
  warmup_steps: int
  peak_learning_rate: float
  steps_per_epoch: float  # training examples / global batch

  @property
  def epochs(self) -> float:
    return self.total_steps / self.steps_per_epoch

  @property
  def warmup_epochs(self) -> float:
    return self.warmup_steps / self.steps_per_epoch

  def as_dict(self) -> dict:
    return dict(total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                peak_learning_rate=self.peak_learning_rate,
                steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                warmup_epochs=self.warmup_epochs)


def _epochs_to_steps(epochs: float, num_train_examples: int, batch_size: int) -> int:
  # Rounded up, so that the last partial epoch is trained, not dropped.
  return int(math.ceil(epochs * num_train_examples / batch_size))


def total_train_steps(train_config, num_train_examples: int) -> int:
  """`train.steps` when set, else enough steps for `train.num_epochs` epochs."""
  if train_config.steps and train_config.steps > 0:
    return int(train_config.steps)
  return _epochs_to_steps(train_config.num_epochs, num_train_examples, train_config.batch_size)


def warmup_steps(train_config, num_train_examples: int | None) -> int:
  """`train.warmup_steps`, or `train.warmup_epochs` in steps of this run's global batch."""
  if not train_config.warmup_epochs:
    return int(train_config.warmup_steps)
  if num_train_examples is None:
    raise ConfigError(
        f"config.train.warmup_epochs={train_config.warmup_epochs!r} needs the training set's "
        "size to be turned into steps; pass num_train_examples, or give "
        "config.train.warmup_steps instead.")
  return _epochs_to_steps(train_config.warmup_epochs, num_train_examples,
                          train_config.batch_size)


def peak_learning_rate(train_config) -> float:
  """`train.learning_rate` scaled linearly from `train.lr_reference_batch` to the global batch.

  `lr_reference_batch` = 0 switches the scaling off: the peak is
  `train.learning_rate` at any batch.
  """
  if not train_config.lr_reference_batch:
    return float(train_config.learning_rate)
  return float(train_config.learning_rate * train_config.batch_size
               / train_config.lr_reference_batch)


def derive_recipe(train_config, num_train_examples: int) -> Recipe:
  return Recipe(total_steps=total_train_steps(train_config, num_train_examples),
                warmup_steps=warmup_steps(train_config, num_train_examples),
                peak_learning_rate=peak_learning_rate(train_config),
                steps_per_epoch=num_train_examples / train_config.batch_size)


def learning_rate_schedule(train_config, total_steps: int, *,
                           num_train_examples: int | None = None) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine to 0 at `total_steps`.

  `num_train_examples` is needed only when the warmup is given in epochs.
  """
  peak = peak_learning_rate(train_config)
  warmup = warmup_steps(train_config, num_train_examples)
  if train_config.schedule == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    return optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(  # 'cosine'
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def weight_decay_mask(params, mode: str):
  """Which leaves weight decay applies to.

  'all' decays every parameter, as the study did (AdamW's default in PyTorch
  when all parameters form one group). 'matrices' decays only Dense/Conv
  kernels: norms, biases, position embeddings, the class token and the
  lambda vectors are left alone, the usual practice for ViTs.
  """
  if mode == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  flat = traverse_util.flatten_dict(params)  # 'matrices'
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def create_optimizer(train_config, total_steps: int, *,
                     num_train_examples: int | None = None) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config, total_steps,
                                    num_train_examples=num_train_examples)
  mode = train_config.weight_decay_mask
  adamw = optax.adamw(
      schedule, b1=train_config.b1, b2=train_config.b2,
      weight_decay=train_config.weight_decay,
      mask=lambda params: weight_decay_mask(params, mode))
  # The clip is always in the chain (an infinite threshold when off), so the
  # optimizer state has one structure and a run can resume with clipping
  # switched on or off.
  clip = train_config.grad_clip if train_config.grad_clip > 0 else float("inf")
  return optax.chain(optax.clip_by_global_norm(clip), adamw)
