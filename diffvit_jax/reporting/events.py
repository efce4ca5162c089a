"""Scalar series from the TensorBoard event files CLU writes into a workdir.

CLU's `SummaryWriter` writes scalars with `tf.summary.scalar`, i.e. as tensor
summaries (TF2); older writers use `simple_value`. Both are read. A run that
is interrupted and resumed from its checkpoint at step s writes a new event
file and logs steps after s again: per tag, the values of the later file
replace every older value at or after its first step (as TensorBoard's
"orphaned data" purge does), so a series has one value per step, the last
one written, and no points from the abandoned stretch.
"""

import glob
import math
import os

import numpy as np

from diffvit_jax.errors import DataError

EVENT_GLOB = "events.out.tfevents.*"


class Series:
  """One scalar tag: `steps` (int64, increasing) and `values` (float64) of equal length."""

  def __init__(self, steps, values):
    self.steps = np.asarray(steps, np.int64)
    self.values = np.asarray(values, np.float64)

  def __len__(self):
    return len(self.steps)

  def __repr__(self):
    return f"Series({len(self)} points, steps {self.steps[:1]}..{self.steps[-1:]})"

  @property
  def last(self) -> float:
    return float(self.values[-1])


def event_files(workdir: str) -> list[str]:
  """The event files written directly in `workdir` (sorted by name; see `read_scalars`)."""
  return sorted(glob.glob(os.path.join(workdir, EVENT_GLOB)))


def _scalar_value(value) -> float | None:
  """The float in a summary value, or None if it is not a scalar (text, hparams, images)."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if not value.HasField("tensor"):
    return None
  plugin = value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""
  if plugin not in ("", "scalars"):
    return None
  from tensorboard.util import tensor_util

  try:
    array = tensor_util.make_ndarray(value.tensor)
  except (TypeError, ValueError):
    return None
  if array.size != 1 or not np.issubdtype(array.dtype, np.number):
    return None
  return float(array.reshape(()))


def _read_file(path: str) -> tuple[float, dict[str, dict[int, float]]]:
  """(wall time of the first event, tag -> {step: value}) of one event file.

  Within a file, a later write of a step wins.
  """
  from tensorboard.backend.event_processing import event_file_loader

  first_wall_time = math.inf
  series: dict[str, dict[int, float]] = {}
  try:
    for event in event_file_loader.LegacyEventFileLoader(path).Load():
      first_wall_time = min(first_wall_time, event.wall_time)
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        scalar = _scalar_value(value)
        if scalar is not None:
          series.setdefault(value.tag, {})[int(event.step)] = scalar
  except Exception as e:
    # A writer killed mid-record leaves a truncated file; what came before is valid.
    if not series:
      raise DataError(f"Cannot read the TensorBoard event file {path} ({type(e).__name__}: "
                      f"{e}). Delete it if it is damaged; the run's other files are "
                      "unaffected.") from e
  return first_wall_time, series


def read_scalars(workdir: str) -> dict[str, Series]:
  """Every scalar tag of a workdir: tag -> Series (one value per step, see module doc).

  Files are merged in the order they were started (the wall time of their
  first event, sub-second; the time in the file name has whole seconds only).
  """
  files = sorted((_read_file(path) + (path,) for path in event_files(workdir)),
                 key=lambda item: (item[0], item[2]))
  merged: dict[str, dict[int, float]] = {}
  for _, series, _ in files:
    for tag, points in series.items():
      old = merged.setdefault(tag, {})
      restart = min(points)
      for step in [s for s in old if s >= restart]:
        del old[step]  # Orphaned by the resume: the new file re-logs from `restart`.
      old.update(points)
  return {tag: Series(sorted(points), [points[s] for s in sorted(points)])
          for tag, points in merged.items() if points}
