"""The training loop: side effects (data, logging, checkpoints, signals) around the pure step.

Data flows one way: grain host batches -> globally sharded batches on a 1-D
`data` mesh -> the jitted train step -> CLU metrics and orbax checkpoints.
"""

import dataclasses
import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from diffvit_jax import compilation_cache, cpu_runtime, distributed, files, models
from diffvit_jax.data import input_pipeline, sharding
from diffvit_jax.errors import ConfigError, DivergenceError, Preempted
from diffvit_jax.evaluation import attention_share, per_example
from diffvit_jax.training import checkpointing, optim, steps
from diffvit_jax.training import trainer as trainer_lib
from diffvit_jax.training.optim import total_train_steps  # noqa: F401  (the loop's API)

RUN_INFO = checkpointing.RUN_INFO


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps.

  A single-process job gets no preemption notice from orbax, so the loop
  saves a checkpoint at the current step itself and exits; rerunning the
  command resumes there.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C means now.
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def exit_code(self) -> int:
    return 128 + getattr(signal, self.signal_name).value


def evaluate(eval_step, state, config, mesh, *, corruption: str | None = None,
             severity: int | None = None):
  """Loss, top-1 and top-5 over every example of the evaluation split.

  `corruption=None` evaluates what the config says (`data.eval_corruption`,
  clean by default); '' forces the clean split.
  """
  return _evaluate_counted(eval_step, state, config, mesh, corruption=corruption,
                           severity=severity)[0]


def _evaluate_counted(eval_step, state, config, mesh, *, corruption: str | None = None,
                      severity: int | None = None):
  """(`evaluate`'s metrics, the number of real examples they average over, all processes)."""
  collected = None
  for host_batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.train.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      corruption=corruption, severity=severity):
    batch_metrics = eval_step(state, sharding.shard_batch(host_batch, mesh))
    collected = batch_metrics if collected is None else collected.merge(batch_metrics)
  return {k: float(v) for k, v in collected.compute().items()}, int(collected.loss.count)


def _flat_hparams(config) -> dict:
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        flat[name] = value
      else:
        flat[name] = str(value)

  walk("", config)
  return flat


def _write_run_info(workdir: str, info: dict) -> None:
  files.write_json(os.path.join(workdir, RUN_INFO), info)


def _read_run_info(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, RUN_INFO)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


@dataclasses.dataclass
class RunSetup:
  """A run's trainer (model, attention path, state, steps) with its data and checkpoints."""

  trainer: trainer_lib.Trainer
  info: input_pipeline.DatasetInfo
  ckpt: checkpointing.Checkpointer
  recipe: optim.Recipe  # steps, warmup and peak learning rate at this batch and data set


def setup(config, workdir: str, *, for_training: bool = True) -> RunSetup:
  """Everything a run needs before its first step (shared with `eval` mode)."""
  mesh = sharding.make_mesh()
  sharding.check_batch_split(config, mesh.size, mode="train" if for_training else "eval")
  info = input_pipeline.get_dataset_info(config.data)  # DataError: how to get a missing set
  if info.num_classes != config.model.num_classes:
    raise ConfigError(
        f"config.model.num_classes={config.model.num_classes} but the data source "
        f"{config.data.source!r} has {info.num_classes} classes.")
  recipe = optim.derive_recipe(config.train, info.num_train)
  trainer = trainer_lib.build(config, mesh, recipe.total_steps, num_train_examples=info.num_train,
                              for_training=for_training)
  logging.info("Attention: %s (config.model.attention_impl=%r; %s).", trainer.attention.impl,
               trainer.attention.requested, trainer.attention.reason)
  logging.info("Precision: %s.", trainer.precision.describe())
  if trainer.memory_plan is not None:
    logging.info("Memory plan: %s.", trainer.memory_plan.describe())
  logging.info("CPU runtime: %s.", trainer.cpu_runtime)
  return RunSetup(trainer=trainer, info=info, ckpt=checkpointing.Checkpointer(workdir, config),
             recipe=recipe)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and returns final eval metrics."""
  # Signals are caught from here on, not only once the loop starts: with several
  # processes, one killed during set-up would leave the others waiting on it.
  with PreemptionGuard() as guard:
    return _train_and_evaluate(config, workdir, guard)


def _train_and_evaluate(config, workdir: str, guard: PreemptionGuard) -> dict:
  checkpointing.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  cache = compilation_cache.Counter()
  setup_start = time.monotonic()
  run = setup(config, workdir)
  setup_seconds = time.monotonic() - setup_start
  logging.info("Set-up (build and compile) took %.1f s; compilation cache: %s.", setup_seconds,
               cache.describe())
  data_workers = input_pipeline.num_workers(config.data)
  logging.info("Input pipeline: %d worker process(es) (config.data.num_workers=%r).",
               data_workers, config.data.num_workers)
  info, ckpt, mesh = run.info, run.ckpt, run.trainer.mesh
  total_steps, state = run.trainer.total_steps, run.trainer.state
  train_step, eval_step = run.trainer.train_step, run.trainer.eval_step
  is_chief = jax.process_index() == 0
  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.train.batch_size, seed=config.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  start_step = 0
  # Train metrics are accumulated over a logging window and saved with the
  # checkpoint, so a resumed run logs exactly what an uninterrupted one does.
  # Global (replicated) arrays, as the step's own metrics are: orbax saves
  # nothing host-local in a multi-process run.
  def empty_metrics():
    return sharding.replicate(steps.TrainMetrics.empty(), mesh)

  train_metrics = empty_metrics()
  if ckpt.latest_step() is not None:
    state, iterator_state, train_metrics, start_step = ckpt.restore(state, train_metrics)
    train_iter.set_state(iterator_state)
    logging.info("Resumed from the checkpoint at step %d in %s.", start_step, workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  run_info = _read_run_info(workdir)
  run_info.update(
      name=config.name or f"{config.model.arch}", arch=config.model.arch,
      protocol=config.protocol, params=num_params, seed=config.train.seed,
      batch_size=config.train.batch_size,
      num_train=info.num_train, num_eval=info.num_eval,
      **run.recipe.as_dict(),
      attention=run.trainer.attention.as_dict(), cpu_runtime=run.trainer.cpu_runtime,
      precision=run.trainer.precision.as_dict(), memory_plan=run.trainer.memory_plan.as_dict(),
      data_workers=data_workers, setup_seconds=round(setup_seconds, 3),
      compilation_cache=cache.summary(), config=json.loads(config.to_json_best_effort()))
  run_info.setdefault("train_seconds", 0.0)
  if is_chief:  # Now, not at the first save: the tools read the run's config from here.
    _write_run_info(workdir, run_info)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))
    parameter_overview.log_parameter_overview(state.params)
  recipe = run.recipe
  logging.info("%s: %d parameters, %d steps of global batch %d (%.2f epochs of %d), "
               "warmup %d steps (%.2f epochs), peak learning rate %.4g%s, %d device(s).",
               run_info["name"], num_params, recipe.total_steps, config.train.batch_size,
               recipe.epochs, info.num_train, recipe.warmup_steps, recipe.warmup_epochs,
               recipe.peak_learning_rate,
               (f" (train.learning_rate {config.train.learning_rate:.4g} at batch "
                f"{config.train.lr_reference_batch}, scaled linearly)"
                if config.train.lr_reference_batch else ""),
               jax.device_count())

  hooks = [periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.train.log_every,
      every_secs=None)]
  if config.train.profile and is_chief:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))

  # Its state is that of the first batch not yet consumed, whatever it prefetched.
  batches = sharding.prefetch_to_device(train_iter, mesh, config.data.prefetch)
  best_top1 = run_info.get("best_top1", -1.0)
  eval_metrics = run_info.get("final_eval", {})
  window_start = time.monotonic()
  session_start = time.monotonic()

  def check_finite(summary):
    """Stops the run at the first non-finite step (its update was not applied)."""
    bad = summary.pop("nonfinite")
    first = min(bad.values())
    if first == np.iinfo(np.int32).max:
      return
    which = min(bad, key=bad.get).replace("_", " ")
    if config.train.on_nonfinite == "skip":
      logging.warning("Skipped non-finite steps (the %s, first at step %d).", which, first)
      return
    ckpt.wait()
    raise DivergenceError(
        f"Training diverged: the {which} was not finite at step {first} (learning rate "
        f"{summary['learning_rate']:.3g}). That update was not applied and nothing after it "
        f"was saved; the last good checkpoint is step {ckpt.latest_step()} in {workdir}. "
        "Train again with a lower config.train.learning_rate or a config.train.grad_clip in "
        "a new --workdir (a run resumes only with its own recipe), or resume this one with "
        "config.train.on_nonfinite='skip' to skip such steps.")

  in_flight = cpu_runtime.StepQueue(cpu_runtime.max_steps_in_flight())
  with metric_writers.ensure_flushes(writer):
    step = start_step
    while step < total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(batches)
        state, step_metrics = train_step(state, batch)
        in_flight.push(step_metrics)
      train_metrics = train_metrics.merge(step_metrics)
      step += 1
      for hook in hooks:
        hook(step)

      is_last = step == total_steps
      log_now = step % config.train.log_every == 0 or is_last
      eval_now = step % config.train.eval_every == 0 or is_last
      save_now = step % config.train.checkpoint_every == 0 or is_last
      # Every process stops at the same step, whichever of them got the signal and
      # when: the saves and collectives after it must match. With several processes
      # the flags are gathered only where the host synchronises anyway, so steps stay
      # queued on the devices in between.
      gather = (log_now or eval_now or save_now
                or step % config.train.stop_check_every == 0)
      preempted = distributed.stop_agreed(step, guard.signal_name is not None, gather=gather)
      if log_now or eval_now or save_now or preempted:
        # The only host synchronisation (but for the CPU's per-step wait, see cpu_runtime.py):
        # nothing unchecked is evaluated or saved.
        summary = train_metrics.compute()
        check_finite(summary)
      if log_now:
        steps_in_window = int(train_metrics.loss.count)
        scalars = {f"train/{k}": float(v) for k, v in summary.items()}
        scalars["train/epoch"] = step * config.train.batch_size / info.num_train
        scalars["train/images_per_sec"] = (
            steps_in_window * config.train.batch_size / (time.monotonic() - window_start))
        lambdas = models.lambda_per_layer(state.params, config.model)
        if lambdas is not None:
          scalars.update({f"lambda/layer_{i + 1}": float(v) for i, v in enumerate(lambdas)})
        writer.write_scalars(step, scalars)
        run_info["images_per_sec"] = scalars["train/images_per_sec"]
        train_metrics, window_start = empty_metrics(), time.monotonic()

      if eval_now:
        eval_metrics, eval_examples = _evaluate_counted(eval_step, state, config, mesh)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        if eval_metrics["top1"] > best_top1:
          best_top1 = eval_metrics["top1"]
          ckpt.save_best(step, state, eval_metrics)
        run_info.update(best_top1=best_top1, final_eval=eval_metrics, eval_step=step,
                        eval_examples=eval_examples)
        window_start = time.monotonic()  # Evaluation time is not training throughput.

      if save_now or preempted:
        ckpt.save(step, state, batches.get_state(), train_metrics)
      if preempted and not is_last:
        ckpt.wait()
        run_info["train_seconds"] += time.monotonic() - session_start
        if is_chief:
          _write_run_info(workdir, run_info)
        received = guard.signal_name or "SIGTERM on this or another process"
        raise Preempted(
            f"Received {received} at step {step}/{total_steps}: saved a checkpoint in "
            f"{workdir}. Rerun the same command to resume from step {step}.",
            guard.exit_code if guard.signal_name else 128 + signal.SIGTERM.value)

  per_example.write_final(state, config, mesh, workdir, total_steps)  # The report pairs by it.
  attention_share.write_final(state, config, workdir, total_steps)  # sources with patch kinds
  ckpt.wait()
  ckpt.close()
  run_info["train_seconds"] += time.monotonic() - session_start
  run_info["completed_steps"] = total_steps
  run_info["compilation_cache"] = cache.summary()  # with the evaluation's compiles
  if is_chief:
    _write_run_info(workdir, run_info)
  return eval_metrics


def evaluate_checkpoint(config, workdir: str, *, best: bool = False) -> dict:
  """`--mode eval`: the latest (or best) checkpoint on the evaluation split."""
  run = setup(config, workdir, for_training=False)
  ckpt, trainer = run.ckpt, run.trainer
  state, eval_step, mesh = trainer.state, trainer.eval_step, trainer.mesh
  if ckpt.latest_step() is None:
    raise checkpointing.CheckpointError(
        f"No checkpoint in {workdir}: train first (same --config and --workdir).")
  if best:
    state, step = ckpt.restore_best(state)
  else:
    state, _, _, step = ckpt.restore(state, sharding.replicate(steps.TrainMetrics.empty(),
                                                               mesh))
  metrics = evaluate(eval_step, state, config, mesh)
  metrics["step"] = step
  return metrics


