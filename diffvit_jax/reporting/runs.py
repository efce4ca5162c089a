"""A training workdir as a `Run` (run_info.json + scalar series) and runs grouped by config.

Seeds of one config are one `Group`: the group key is the run's name and
protocol (the config name minus the seed) plus its model size. The size is
parsed from names such as 'vit_10m,v2'; runs whose names carry none (the
digits runs) are sized by their model shape and labelled with the parameter
count of the smallest model of that shape, so that a ViT and the DiffViT it is
matched with land in the same size.
"""

import dataclasses
import functools
import json
import os
import re
import warnings

import numpy as np

from diffvit_jax.errors import DataError, UserError
from diffvit_jax.models import registry
from diffvit_jax.reporting import events

RUN_INFO = "run_info.json"
ROBUSTNESS_JSON = "robustness.json"
_SIZE_IN_NAME = re.compile(r"_(\d+(?:\.\d+)?[kmb])(?:,|$)", re.IGNORECASE)
# What a model's size is when its name does not say.
_SHAPE_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")
# Model fields the FLOP count depends on; a run_info.json without them has no FLOP count.
_FLOP_FIELDS = ("arch",) + _SHAPE_FIELDS + ("pool", "num_classes")


@dataclasses.dataclass
class Run:
  workdir: str
  info: dict  # run_info.json
  scalars: dict[str, events.Series]
  robustness: dict | None  # robustness.json, when `--mode eval_corrupted` was run
  size: str = ""  # filled in by `assign_sizes`

  @property
  def name(self) -> str:
    return self.info.get("name") or self.arch

  @property
  def arch(self) -> str:
    return self.info.get("arch") or self.info.get("config", {}).get("model", {}).get("arch", "?")

  @property
  def protocol(self) -> str:
    return self.info.get("protocol") or ""

  @property
  def seed(self) -> int:
    return int(self.info.get("seed", 0))

  @property
  def params(self) -> int:
    return int(self.info.get("params", 0))

  @property
  def steps_per_epoch(self) -> float:
    return float(self.info.get("steps_per_epoch") or 0.0)

  def series(self, tag: str) -> events.Series | None:
    return self.scalars.get(tag)

  def lambda_tags(self) -> list[str]:
    """'lambda/layer_<i>' tags in layer order (differential models only)."""
    tags = [t for t in self.scalars if re.fullmatch(r"lambda/layer_\d+", t)]
    return sorted(tags, key=lambda t: int(t.rsplit("_", 1)[1]))

  def summary(self) -> dict[str, float]:
    """The numbers of the results table, from the events (run_info.json when there are none).

    final_top1/top5/loss: the last evaluation, the headline (chosen before
    looking at any result). best_top1: the highest validation top-1 over the
    evaluations; best_top5/best_loss/best_step are those of that same
    evaluation (the first one if several tie, as the trainer's best
    checkpoint). It is selected on the validation split, which is also the
    only labelled held-out set, so it is an optimistic estimate. Throughput:
    the median over logging windows of `train/images_per_sec` (a median,
    because the first window of every session includes compilation); wall
    time: `train_seconds` (all sessions, evaluation included).
    """
    final_eval = self.info.get("final_eval") or {}
    out = {}
    for key in ("top1", "top5", "loss"):
      series = self.series(f"eval/{key}")
      out[f"final_{key}"] = series.last if series else float(final_eval.get(key, np.nan))
    top1 = self.series("eval/top1")
    if top1:
      best = int(np.argmax(top1.values))
      out["best_top1"] = float(top1.values[best])
      out["best_step"] = float(top1.steps[best])
      for key in ("top5", "loss"):
        out[f"best_{key}"] = self._value_at(f"eval/{key}", int(top1.steps[best]))
    else:  # run_info.json keeps the best top-1 but not the evaluation it came from.
      out["best_top1"] = float(self.info.get("best_top1", np.nan))
      out["best_step"] = out["best_top5"] = out["best_loss"] = np.nan
    throughput = self.series("train/images_per_sec")
    out["images_per_sec"] = (float(np.median(throughput.values)) if throughput
                             else float(self.info.get("images_per_sec", np.nan)))
    out["train_seconds"] = float(self.info.get("train_seconds", np.nan))
    out["steps"] = float(top1.steps[-1]) if top1 else float(self.info.get("eval_step", np.nan))
    return out

  def _value_at(self, tag: str, step: int) -> float:
    series = self.series(tag)
    if series is None:
      return np.nan
    where = np.flatnonzero(series.steps == step)
    return float(series.values[where[0]]) if len(where) else np.nan

  def gflops_per_image(self) -> float:
    """Training (forward + backward) GFLOPs per image of the run's model, NaN if unknown.

    Computed from the run's config with `models.stats.gflops_per_image`;
    runs whose run_info.json has no complete model config get NaN.
    """
    config = self.info.get("config", {})
    image_size = config.get("data", {}).get("image_size")
    if not image_size or any(f not in config.get("model", {}) for f in _FLOP_FIELDS):
      return np.nan
    from diffvit_jax import config_lib
    from diffvit_jax.models import stats

    try:
      model = config_lib.model_config(**config["model"])
      return float(stats.gflops_per_image(model, int(image_size)))
    except (UserError, KeyError, TypeError, ValueError):  # A config of other code.
      return np.nan


def load_run(workdir: str) -> Run:
  path = os.path.join(workdir, RUN_INFO)
  try:
    with open(path) as f:
      info = json.load(f)
  except FileNotFoundError as e:
    raise DataError(f"{workdir!r} is not a training workdir: it has no {RUN_INFO}. Pass the "
                    "directories given to `diffvit_jax.main --workdir` (the trainer writes "
                    f"{RUN_INFO} there at the end of each session).") from e
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}); rerun or finish that run.") from e
  robustness = None
  robustness_path = os.path.join(workdir, ROBUSTNESS_JSON)
  if os.path.exists(robustness_path):
    with open(robustness_path) as f:
      robustness = json.load(f)
    if "mean_corruption_error" not in robustness:  # Still running, or interrupted.
      warnings.warn(f"{robustness_path} is incomplete (an evaluation still running or "
                    "interrupted): left out of the report.", stacklevel=2)
      robustness = None
  return Run(workdir=workdir, info=info, scalars=events.read_scalars(workdir),
             robustness=robustness)


def format_params(count: float) -> str:
  """12345678 -> '12.3M', 28266 -> '28.3k': three significant digits."""
  if count < 1e6:
    return f"{count / 1e3:.3g}k"
  return f"{count / 1e6:.3g}M"


def _shape_key(run: Run) -> tuple:
  model = run.info.get("config", {}).get("model", {})
  image_size = run.info.get("config", {}).get("data", {}).get("image_size")
  return tuple(model.get(f) for f in _SHAPE_FIELDS) + (image_size,)


def assign_sizes(runs: list[Run]) -> None:
  """Sets `run.size`: from the name ('vit_10m,v2' -> '10m'), else from the model shape."""
  unnamed: dict[tuple, list[Run]] = {}
  for run in runs:
    match = _SIZE_IN_NAME.search(run.name)
    if match:
      run.size = match.group(1).lower()
    else:
      unnamed.setdefault((run.protocol, _shape_key(run)), []).append(run)
  for members in unnamed.values():
    label = format_params(min(r.params for r in members))
    for run in members:
      run.size = label


def _size_order(size: str) -> float:
  match = re.match(r"(\d+(?:\.\d+)?)([kmb]?)", size.lower())
  if not match:
    return float("inf")
  return float(match.group(1)) * {"k": 1e-3, "m": 1.0, "b": 1e3, "": 1.0}[match.group(2)]


@dataclasses.dataclass
class Group:
  """The seeds of one config."""

  protocol: str
  size: str
  arch: str
  name: str
  runs: list[Run]

  @property
  def label(self) -> str:
    return registry.label(self.arch)

  @property
  def differential(self) -> bool | None:
    """Whether the arch is a differential kind; None for an arch the registry does not know."""
    kind = registry.ARCHS.get(self.arch)
    return None if kind is None else kind.differential

  @property
  def params(self) -> float:
    return float(np.mean([r.params for r in self.runs]))

  @functools.cached_property
  def gflops_per_image(self) -> float:
    """Training GFLOPs per image of the first seed's model (the seeds share the config)."""
    return self.runs[0].gflops_per_image()

  @property
  def seeds(self) -> list[int]:
    return sorted(r.seed for r in self.runs)

  def sort_key(self):
    order = list(registry.ARCHS)
    arch = order.index(self.arch) if self.arch in order else len(order)
    return (self.protocol, _size_order(self.size), self.size, arch, self.name)


def group_runs(runs: list[Run]) -> list[Group]:
  """Groups the seeds of each config, sorted by protocol, size, architecture."""
  assign_sizes(runs)
  groups: dict[tuple, Group] = {}
  for run in runs:
    key = (run.protocol, run.size, run.arch, run.name)
    group = groups.setdefault(key, Group(run.protocol, run.size, run.arch, run.name, []))
    group.runs.append(run)
  for group in groups.values():
    group.runs.sort(key=lambda r: (r.seed, r.workdir))
    seeds = [r.seed for r in group.runs]
    if len(set(seeds)) != len(seeds):
      warnings.warn(f"{group.name} ({group.protocol}, {group.size}) has several runs with the "
                    f"same seed ({seeds}): {[r.workdir for r in group.runs]}. They are averaged "
                    "as if they were different seeds.", stacklevel=2)
  return sorted(groups.values(), key=Group.sort_key)


def aligned(runs: list[Run], tag: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, values [runs, steps]) at the steps every run has logged, or None.

  A seed still running (or stopped early) shortens the curve of its group
  rather than make the mean jump where it ends.
  """
  series = [r.series(tag) for r in runs]
  if any(s is None or not len(s) for s in series):
    return None
  common = series[0].steps
  for s in series[1:]:
    common = np.intersect1d(common, s.steps)
  if not len(common):
    return None
  values = np.stack([s.values[np.searchsorted(s.steps, common)] for s in series])
  return common, values
