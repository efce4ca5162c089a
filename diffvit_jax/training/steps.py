"""The pure train and eval steps, and the state they carry.

Nothing here does IO or imports TensorFlow, so the benchmark and the GPU
machine can use exactly the step that training uses. Batches arrive as uint8
pixels; the steps normalise them (`data.normalise`) and mix them on the device.
"""
# No `from __future__ import annotations`: clu.metrics.Collection needs real
# annotations to find its metrics.

import functools

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax.training import train_state

from diffvit_jax.data import normalise
from diffvit_jax.models import dropout as dropout_lib
from diffvit_jax.training import optim

_NEVER = jnp.iinfo(jnp.int32).max


class TrainState(train_state.TrainState):
  """Params, optimizer state, step, and the base key of the dropout/mixing stream.

  Each step draws from `fold_in(rng, step)`, so a resumed run reproduces the
  random stream of an uninterrupted one without saving per-step keys.
  """

  rng: jax.Array


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step whose loss / gradient norm was not finite (int32 max if none)."""

  loss_step: jnp.ndarray
  grad_step: jnp.ndarray

  @classmethod
  def from_model_output(cls, step, loss, grad_norm, **_):
    return cls(loss_step=jnp.where(jnp.isfinite(loss), _NEVER, step).astype(jnp.int32),
               grad_step=jnp.where(jnp.isfinite(grad_norm), _NEVER, step).astype(jnp.int32))

  @classmethod
  def empty(cls):
    return cls(loss_step=jnp.array(_NEVER, jnp.int32), grad_step=jnp.array(_NEVER, jnp.int32))

  def merge(self, other):
    return type(self)(loss_step=jnp.minimum(self.loss_step, other.loss_step),
                      grad_step=jnp.minimum(self.grad_step, other.grad_step))

  def compute(self):
    return {"loss": int(self.loss_step), "grad_norm": int(self.grad_step)}


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Logged as `train/<name>`.

  `accuracy_vs_dominant_target` scores the prediction on the image the model
  saw against the class with the largest weight in its (mixed) target: under
  mixup/cutmix that is not the original label, and without mixing it is.
  """

  loss: metrics.Average.from_output("loss")
  accuracy_vs_dominant_target: metrics.Average.from_output("accuracy_vs_dominant_target")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  nonfinite: FirstNonFinite


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  top1: metrics.Average.from_output("top1")
  top5: metrics.Average.from_output("top5")


def create_train_state(rng, model, image_size: int, tx, *, dtype=jnp.float32) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, image_size, image_size, 3), dtype)
  params = model.init({"params": init_rng}, dummy, train=False)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)


def _beta(rng, alpha):
  return jax.random.beta(rng, alpha, alpha)


def _cutmix_box_mask(rng, lam, height, width):
  """A [H, W] mask that is 1 inside a box of area about (1 - lam) * H * W."""
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut_ratio), jnp.floor(width * cut_ratio)
  cy_rng, cx_rng = jax.random.split(rng)
  cy = jax.random.uniform(cy_rng, (), maxval=height)
  cx = jax.random.uniform(cx_rng, (), maxval=width)
  y0, y1 = jnp.clip(cy - cut_h / 2, 0, height), jnp.clip(cy + cut_h / 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w / 2, 0, width), jnp.clip(cx + cut_w / 2, 0, width)
  ys = jnp.arange(height)[:, None] + 0.5
  xs = jnp.arange(width)[None, :] + 0.5
  return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)


def mix_batch(rng, images, targets, *, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float, to_input=lambda x: x):
  """Mixup or CutMix (one of them per batch when both are on, as timm does).

  Each example is mixed with its mirror in the batch (`flip` over the batch
  axis), so no second batch is needed; the targets are mixed with the area /
  weight actually used. `to_input` turns `images` (e.g. uint8 pixels) into the
  model's input: the mirror is taken before it, so the partners that cross
  devices are the compact pixels, and both sides are converted before mixing.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return to_input(images), targets
  choice_rng, mixup_rng, cutmix_rng, box_rng, apply_rng = jax.random.split(rng, 5)
  height, width = images.shape[1:3]
  partner_images, partner_targets = jnp.flip(images, 0), jnp.flip(targets, 0)

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(choice_rng, 0.5)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = _beta(mixup_rng, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cutmix = _beta(cutmix_rng, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  box = _cutmix_box_mask(box_rng, lam_cutmix, height, width)
  # Pixel weight of the example itself: 1 - box for CutMix, lam for Mixup.
  keep = jnp.where(use_cutmix, 1.0 - box, jnp.full_like(box, lam_mixup))
  keep = jnp.where(jax.random.bernoulli(apply_rng, mix_prob), keep, jnp.ones_like(keep))
  lam = keep.mean()
  images, partner_images = to_input(images), to_input(partner_images)
  keep = keep[None, :, :, None].astype(images.dtype)
  mixed_images = images * keep + partner_images * (1 - keep)
  mixed_targets = targets * lam + partner_targets * (1 - lam)
  return mixed_images, mixed_targets


def smooth_distribution(targets, label_smoothing: float):
  return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def smooth_targets(labels, num_classes: int, label_smoothing: float):
  return smooth_distribution(jax.nn.one_hot(labels, num_classes), label_smoothing)


def training_targets(rng, batch, *, train_config, num_classes: int, to_input=lambda x: x):
  """(model input, targets, dominant class) the loss and train accuracy see.

  Mixing comes before smoothing (the two commute: mixing weights sum to 1),
  so the dominant class is read off the mixed one-hot targets, where a
  smoothing of 1 cannot make every class tie. `to_input`: see `mix_batch`.
  """
  images, mixed = mix_batch(rng, batch["image"], jax.nn.one_hot(batch["label"], num_classes),
                            mixup_alpha=train_config.mixup_alpha,
                            cutmix_alpha=train_config.cutmix_alpha,
                            mix_prob=train_config.mix_prob, to_input=to_input)
  targets = smooth_distribution(mixed, train_config.label_smoothing)
  return images, targets, jnp.argmax(mixed, -1)


def split_microbatches(tree, microbatches: int):
  """[B, ...] leaves -> [microbatches, B / microbatches, ...]; microbatch m = rows m, m + n, ...

  A strided split: each device's rows of a microbatch are among its own rows of
  the batch (nothing moves between devices), and row r of microbatch m is
  example `microbatches * r + m`, which keys its dropout masks (models/dropout.py).
  """
  def split(x):
    x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree_util.tree_map(split, tree)


def train_step(state: TrainState, batch, *, config, learning_rate_fn, microbatches: int = 1,
               microbatch_sharding=None):
  """One AdamW step on a globally sharded batch; returns the new state and metrics.

  The batch's uint8 images are normalised here (config.data.mean / std). Mixing
  is drawn over the whole batch; with `microbatches` > 1 the gradient of the
  mean loss is accumulated over strided microbatches (`lax.scan`), each example
  keeping its dropout and drop-path masks, so the update is the whole-batch
  update up to float rounding. `microbatch_sharding` lays out the
  [microbatches, B / microbatches, ...] split (batch axis over 'data').
  """
  tcfg = config.train
  step_rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, dropout_rng = jax.random.split(step_rng)
  images, targets, dominant = training_targets(
      mix_rng, batch, train_config=tcfg, num_classes=config.model.num_classes,
      to_input=_to_input(config.data))

  def loss_and_grads(params, images, targets, dominant, offset):
    def loss_fn(params):
      with dropout_lib.example_rows(microbatches, offset):
        logits = state.apply_fn({"params": params}, images, train=True,
                                rngs={"dropout": dropout_rng})
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, loss, (jnp.argmax(logits, -1) == dominant).mean()

  if microbatches == 1:
    grads, loss, accuracy = loss_and_grads(state.params, images, targets, dominant, 0)
  else:
    parts = split_microbatches((images, targets, dominant), microbatches)
    if microbatch_sharding is not None:
      parts = jax.lax.with_sharding_constraint(parts, microbatch_sharding)

    def accumulate(total, part):
      index, (part_images, part_targets, part_dominant) = part
      values = loss_and_grads(state.params, part_images, part_targets, part_dominant, index)
      return jax.tree_util.tree_map(jnp.add, total, values), None

    zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), jnp.float32(0),
             jnp.float32(0))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), parts))
    grads, loss, accuracy = jax.tree_util.tree_map(lambda x: x / microbatches, total)

  grad_norm = optax.global_norm(grads)
  new_state = state.apply_gradients(grads=grads)
  # A non-finite step never reaches the parameters: 'skip' carries on from the
  # previous state, 'stop' is enforced by the loop from the reported step.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old), new_state,
      state.replace(step=state.step + 1))
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, accuracy_vs_dominant_target=accuracy, grad_norm=grad_norm,
      learning_rate=learning_rate_fn(state.step), step=state.step)
  return new_state, step_metrics


def _to_input(data_config):
  return functools.partial(normalise.model_input, mean=tuple(data_config.mean),
                           std=tuple(data_config.std))


def eval_step(state: TrainState, batch, *, num_classes: int, data_config):
  images = _to_input(data_config)(batch["image"])
  logits = state.apply_fn({"params": state.params}, images, train=False)
  labels = batch["label"]
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
  top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
  return EvalMetrics.single_from_model_output(
      loss=loss, top1=(top5[:, 0] == labels).astype(jnp.float32),
      top5=(top5 == labels[:, None]).any(-1).astype(jnp.float32), mask=batch["mask"])


def jit_steps(config, mesh, total_steps: int, *, num_train_examples: int | None = None,
              microbatches: int = 1):
  """The jitted train and eval steps: batch sharded over 'data', state replicated.

  The train step donates the incoming state so parameters and optimizer state
  are updated in place. `num_train_examples` turns `train.warmup_epochs` into steps;
  `microbatches` is the memory plan's gradient accumulation (training/memory.py).
  """
  from jax.sharding import NamedSharding, PartitionSpec

  replicated = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec("data"))
  learning_rate_fn = optim.learning_rate_schedule(config.train, total_steps,
                                                  num_train_examples=num_train_examples)
  train = jax.jit(
      functools.partial(train_step, config=config, learning_rate_fn=learning_rate_fn,
                        microbatches=microbatches,
                        microbatch_sharding=NamedSharding(mesh, PartitionSpec(None, "data"))),
      in_shardings=(replicated, data), out_shardings=(replicated, replicated),
      donate_argnums=0)
  evaluate = jax.jit(
      functools.partial(eval_step, num_classes=config.model.num_classes,
                        data_config=config.data),
      in_shardings=(replicated, data), out_shardings=replicated)
  return train, evaluate
