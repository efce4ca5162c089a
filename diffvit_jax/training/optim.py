"""Learning-rate schedule and optimizer: exactly what the config says.

The study documented 500 warmup steps that its code never applied; here the
schedule is built from `config.train` alone and tested at its corners.
"""

import jax
import optax
from flax import traverse_util

from diffvit_jax.errors import ConfigError


def learning_rate_schedule(train_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine to 0 at `total_steps`."""
  peak = train_config.learning_rate
  warmup = int(train_config.warmup_steps)
  if train_config.schedule == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    return optax.constant_schedule(peak)
  if train_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  raise ConfigError(f"config.train.schedule={train_config.schedule!r} is unknown; "
                    "use 'cosine' or 'constant'.")


def weight_decay_mask(params, mode: str):
  """Which leaves weight decay applies to.

  'all' decays every parameter, as the study did (AdamW's default in PyTorch
  when all parameters form one group). 'matrices' decays only Dense/Conv
  kernels: norms, biases, position embeddings, the class token and the
  lambda vectors are left alone, the usual practice for ViTs.
  """
  if mode == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  if mode == "matrices":
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})
  raise ConfigError(f"config.train.weight_decay_mask={mode!r} is unknown; "
                    "use 'all' or 'matrices'.")


def create_optimizer(train_config, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config, total_steps)
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
