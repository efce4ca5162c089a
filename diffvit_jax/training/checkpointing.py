"""Checkpoints: train state, input-iterator state and the run's identity, together.

Also where a run is read back: `load_run_config` rebuilds the config a run
trained with from its workdir, so the tools that read a run (evaluation,
predict, attention maps) take `--workdir` alone.

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save killed half-way is never listed and never loaded. The
run's identity (model, training data and recipe: `resume_identity`) is stored
beside the state; a workdir whose checkpoints belong to another model, seed,
batch or recipe is refused with the differences named, instead of being
loaded into the wrong shapes or continued as a run that never was.
"""

import contextlib
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from diffvit_jax.errors import CheckpointError, ConfigError
from diffvit_jax.models import registry

RUN_INFO = "run_info.json"  # The run's summary, with the config it trained with under 'config'.
# Free space a save needs: the latest and the best checkpoint of one step (written beside the
# kept ones before an old one is deleted), and orbax's metadata files.
ROOM_FACTOR = 2.0
ROOM_OVERHEAD = 4 * 2**20

# Config fields that change the parameter tree or what the numbers mean.
IDENTITY_FIELDS = {
    "model": ("arch", "width", "depth", "num_heads", "mlp_dim", "patch_size", "pool", "posemb",
              "norm", "attn_bias", "num_classes"),  # and every attention kind's own fields
    "data": ("source", "image_size"),
}


# Fields that may change when a run resumes without changing what it computes: how it is
# split into microbatches and rematerialised, the attention path (equal math), how often it
# logs, evaluates and saves, the evaluation's batch, what it does on a non-finite step (the
# fix a divergence error suggests), and how long it trains (extending a finished run).
# Everything else of `train`, the model and the training data is the resume identity.
RESUME_EXEMPT = {
    "model": ("remat", "attention_impl", "attention_chunk_mib", "cpu_dense_grad"),
    "data": ("dir", "manual_dir", "num_workers", "read_threads", "prefetch", "eval_split",
             "eval_corruption", "eval_severity", "corruption_jpeg", "on_bad_image"),
    "train": ("microbatches", "device_memory_gib", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints", "profile", "stop_check_every",
              "eval_batch_size", "on_nonfinite", "distributed", "steps", "num_epochs"),
}


def check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is, or can be made, a writable directory."""
  if not workdir:
    raise ConfigError("--workdir is empty: give a directory for checkpoints and logs.")
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir!r} is not writable (checked {parent!r}).")


def run_identity(config) -> dict[str, Any]:
  """The model and data set fields: what a tool that reads a run must agree with."""
  fields = dict(IDENTITY_FIELDS, model=IDENTITY_FIELDS["model"] + tuple(registry.config_fields()))
  return {f"{section}.{name}": config[section][name]
          for section, names in fields.items() for name in names}


def _jsonable(value):
  if hasattr(value, "to_dict"):  # a config section within a section (data.clutter)
    return {k: _jsonable(v) for k, v in value.to_dict().items()}
  return list(value) if isinstance(value, tuple) else value


def resume_identity(config) -> dict[str, Any]:
  """What a resumed run must share with its checkpoints: every field but `RESUME_EXEMPT`."""
  identity = {}
  for section in ("model", "data", "train"):
    for name, value in config[section].items():
      if name not in RESUME_EXEMPT[section]:
        identity[f"{section}.{name}"] = _jsonable(value)
  return identity


def identity_differences(config, run_config) -> list[str]:
  """'field: run has X, config has Y' for each identity field where `config` differs."""
  mine, theirs = run_identity(config), run_identity(run_config)
  return [f"{k}: the run has {theirs.get(k)!r}, the config has {v!r}"
          for k, v in mine.items() if theirs.get(k) != v]


def check_same_run(config, run_config, workdir: str) -> None:
  """CheckpointError naming the fields where `config` describes another model or data set."""
  diffs = identity_differences(config, run_config)
  if diffs:
    raise CheckpointError(
        f"The run in {workdir} is of another model or data set than the given config "
        f"({'; '.join(diffs)}). Tools that read a run take its config from --workdir; a "
        "config given as well must describe the same model and data.")


def _merge_saved(node, saved: dict) -> None:
  """Writes saved values over the schema's defaults, keeping tuples tuples (JSON has lists)."""
  import ml_collections

  for key, value in saved.items():
    default = node.get(key)
    if isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
      _merge_saved(default, value)
      continue
    if isinstance(default, tuple) and isinstance(value, list):
      value = tuple(value)
    # A field the schema no longer has is kept as the run had it; a value of another type
    # than today's default (an int where a float is now expected) is taken as saved.
    with node.ignore_type():
      node[key] = value


def config_from_saved(saved: dict):
  """A saved config (JSON object) -> ConfigDict of today's schema, locked like a config file's.

  Fields added to the schema after the run was trained take their defaults,
  which is what the code did before they existed.
  """
  from diffvit_jax import config_lib

  config = config_lib.base_config()
  _merge_saved(config, saved)
  config.lock()
  return config


def _latest_checkpoint_config(workdir: str) -> dict | None:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return meta.get("config")


def load_run_config(workdir: str):
  """The config the run in `workdir` trained with (a locked ConfigDict).

  Read from RUN_INFO, which training writes before its first step; runs from
  before that was so fall back to the config saved with the latest checkpoint.
  """
  saved = None
  path = os.path.join(workdir, RUN_INFO)
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f).get("config")
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); it holds the "
                            "run's config. Restore it, or pass the run's --workdir.") from e
  if saved is None:
    saved = _latest_checkpoint_config(workdir)
  if saved is None:
    raise CheckpointError(
        f"{workdir!r} holds no training run: neither {RUN_INFO} nor a checkpoint with the "
        "run's config. Pass the --workdir a run was trained in.")
  return config_from_saved(saved)


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _encode_iterator_state(state) -> dict:
  # grain's DataLoader iterators give bytes (JSON), dataset iterators a dict.
  if isinstance(state, bytes):
    return {"grain_bytes": state.decode()}
  return {"grain_dict": state}


def decode_iterator_state(encoded: dict):
  if "grain_bytes" in encoded:
    return encoded["grain_bytes"].encode()
  return encoded["grain_dict"]


def _barriers(name: str):
  # Orbax names its cross-process barriers after the step directory ("8"), so the latest
  # and best managers saving one step at once would join the same barrier and fail
  # ("Barrier _async_write_complete.8 is already ongoing"): each gets its own prefix.
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def state_bytes(tree) -> int:
  """Bytes of the arrays in `tree`: about what one checkpoint of it takes on disk."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))


class Checkpointer:
  """Latest-K checkpoints in `<workdir>/checkpoints`, the best one in `<workdir>/best`.

  A save that cannot be written (no space, a read-only or vanished file system)
  stops the run with one paragraph, the checkpoints already written untouched.
  """

  def __init__(self, workdir: str, config):
    self._identity = resume_identity(config)
    self._config_json = config.to_json_best_effort()
    root = os.path.abspath(workdir)
    self.root = root
    self._last_write = (None, 0)  # (step, bytes) of the latest save, for wait()'s errors
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.train.keep_checkpoints, create=True,
            enable_async_checkpointing=True, multiprocessing_options=_barriers("latest")))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["top1"], best_mode="max",
            enable_async_checkpointing=True, multiprocessing_options=_barriers("best")))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def _check_identity(self, manager, step):
    """CheckpointError naming each identity field where the checkpoint and config differ.

    A field the checkpoint's identity lacks (saved by older code) is read from
    the config saved with it, and not compared where that lacks it too.
    """
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved_identity = saved.get("identity", {})
    saved_config = saved.get("config") or {}
    diffs = []
    for key, value in self._identity.items():
      if key in saved_identity:
        theirs = saved_identity[key]
      else:
        section, name = key.split(".", 1)
        if name not in saved_config.get(section, {}):
          continue
        theirs = _jsonable(saved_config[section][name])
      if theirs != value:
        diffs.append(f"{key}: checkpoint has {theirs!r}, config has {value!r}")
    if diffs:
      raise CheckpointError(
          f"The checkpoints in {manager.directory} belong to a different run "
          f"({'; '.join(diffs)}). Refusing to resume from them: a run continues with the "
          "model, data and training recipe (seed, batch, optimiser, schedule, augmentation) "
          "it started with, so that its result is that of one uninterrupted run. Use a new "
          "--workdir for the new config, or restore the original config to resume that run.")

  def _finished_steps(self) -> list[int]:
    """Steps whose checkpoints were completed (orbax renames a finished save to its step)."""
    try:
      return sorted(int(n) for n in os.listdir(self.latest.directory) if n.isdigit())
    except OSError:
      return []

  def _write_failed(self, step: int, need: int, cause: BaseException | str) -> CheckpointError:
    for manager in (self.latest, self.best):  # Saves still in flight finish (or fail) first.
      with contextlib.suppress(Exception):
        manager.wait_until_finished()
    last = (self._finished_steps() or [None])[-1]
    try:
      free = f"{shutil.disk_usage(self.root).free / 2**20:.0f} MiB free"
    except OSError:
      free = "the file system cannot be read"
    reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: " + (
        str(cause).splitlines() or [""])[0]
    return CheckpointError(
        f"Could not save the checkpoint of step {step} in {self.root} ({reason}; {free}). One "
        f"checkpoint of this run takes about {need / 2**20:.0f} MiB. The checkpoints already "
        f"written are untouched: the last good one is "
        f"{'step ' + str(last) if last is not None else 'none (no step was saved yet)'}. Free "
        "space or make the workdir writable (or copy it to a file system that is), then rerun "
        "the same command to resume from there.")

  @contextlib.contextmanager
  def _writing(self, step: int, need: int):
    """Checks for room first; turns any failure of the save into `_write_failed`."""
    try:
      free = shutil.disk_usage(self.root).free
    except OSError as e:
      raise self._write_failed(step, need, e) from None
    if free < ROOM_FACTOR * need + ROOM_OVERHEAD:
      raise self._write_failed(step, need, "not enough free space for it")
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax surfaces IO failures as many types
      raise self._write_failed(step, need, e) from None

  def save(self, step: int, state, iterator_state, train_metrics) -> None:
    self._last_write = (step, state_bytes(state))
    with self._writing(*self._last_write):
      self._save(step, state, iterator_state, train_metrics)

  def _save(self, step: int, state, iterator_state, train_metrics) -> None:
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        train_metrics=ocp.args.StandardSave(train_metrics),
        data=ocp.args.JsonSave(_encode_iterator_state(iterator_state)),
        meta=ocp.args.JsonSave({"identity": self._identity, "step": step,
                                "config": json.loads(self._config_json)})), force=True)

  def save_best(self, step: int, state, eval_metrics: dict[str, float]) -> None:
    self._last_write = (step, state_bytes(state))
    with self._writing(*self._last_write):
      self._save_best(step, state, eval_metrics)

  def _save_best(self, step: int, state, eval_metrics: dict[str, float]) -> None:
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"identity": self._identity, "step": step,
                                "metrics": eval_metrics})),
        metrics={k: float(v) for k, v in eval_metrics.items()}, force=True)

  def restore(self, state_template, metrics_template):
    """(state, iterator_state, train_metrics, step) of the latest checkpoint that restores.

    Orbax never lists a save that was killed before it finished; a listed
    checkpoint that still fails to read (files damaged afterwards) is skipped
    with a warning in favour of the one before it.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.latest.directory}.")
    self._check_identity(self.latest, steps[0])
    failures = []
    for step in steps:
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_template)),
            train_metrics=ocp.args.StandardRestore(_abstract(metrics_template)),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any damage means: try the previous one.
        if "do not match" in str(e) or "shape" in str(e).lower():
          raise CheckpointError(
              f"Checkpoint {step} in {self.latest.directory} has a different structure from "
              f"this run's state ({str(e).splitlines()[0]}): the config changed something the "
              "saved state depends on. Use a new --workdir or the original config.") from e
        failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[:1]}")
        # Moved aside, not deleted: it no longer blocks re-saving this step,
        # and its files stay for inspection.
        damaged = os.path.join(str(self.latest.directory), f"{step}.damaged-{int(time.time())}")
        os.rename(os.path.join(str(self.latest.directory), str(step)), damaged)
        self.latest.reload()
        logging.warning("Checkpoint %d in %s cannot be restored (%s); moved it to %s and trying "
                        "the previous one.", step, self.latest.directory, e, damaged)
        continue
      return (restored["state"], decode_iterator_state(restored["data"]),
              restored["train_metrics"], step)
    raise CheckpointError(
        f"No checkpoint in {self.latest.directory} could be restored into this model: "
        f"{'; '.join(failures)}.")

  def restore_best(self, state_template):
    """(state, step) of the checkpoint with the best validation top-1."""
    step = self.best.best_step()
    if step is None:
      raise CheckpointError(f"No best checkpoint in {self.best.directory}.")
    self._check_identity(self.best, step)
    restored = self.best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_template))))
    return restored["state"], step

  def wait(self) -> None:
    """Waits for the asynchronous saves; a failed one is `_write_failed`'s paragraph."""
    step, need = self._last_write
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - see _writing
      raise self._write_failed(step, need, e) from None

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def load_for_inference(workdir: str, *, best: bool = False):
  """(params, config, step) of a run's latest (or best) checkpoint, no template needed.

  For the analysis tools (predict, attention maps, corrupted evaluation),
  which need the parameters and the run's config (`load_run_config`) but not
  the optimizer state.
  """
  sub = "best" if best else "checkpoints"
  directory = os.path.join(os.path.abspath(workdir), sub)
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoints under {directory}: is {workdir!r} a training workdir?")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"No complete checkpoint under {directory}.")
  config = load_run_config(workdir)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]["params"], config, step
