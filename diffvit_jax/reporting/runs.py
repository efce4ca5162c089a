r"""A training workdir as a `Run`, which runs may enter the verdict, and runs grouped by config.

  python -m diffvit_jax.reporting.runs --matches WORKDIR --config CFG [--config.x=y ...]

(exit 0: WORKDIR holds a finished run of that config; 1: no finished run; 3: a
run of another config, the fields named) is what `launch.sh study` asks before
it skips a run.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import re
import sys
import warnings

if __name__ == "__main__":  # Before JAX is imported: a report never starts a GPU backend,
  os.environ["JAX_PLATFORMS"] = "cpu"  # whatever the caller's environment says.

import numpy as np  # noqa: E402

from diffvit_jax.errors import DataError, UserError  # noqa: E402
from diffvit_jax.models import registry  # noqa: E402
from diffvit_jax.reporting import events  # noqa: E402

RUN_INFO = "run_info.json"
ROBUSTNESS_JSON = "robustness.json"
_SIZE_IN_NAME = re.compile(r"_(\d+(?:\.\d+)?[kmb])(?:,|$)", re.IGNORECASE)
# What a model's size is when its name does not say.
_SHAPE_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")
# Model fields the FLOP count depends on; a run_info.json without them has no FLOP count.
_FLOP_FIELDS = ("arch",) + _SHAPE_FIELDS + ("pool", "num_classes")
# Config fields that do not change a run's result: labels, where the data lives, how it is
# read, how the step is split or rematerialised, the attention path (equal math), how often
# it logs, evaluates and saves.
RESULT_NEUTRAL = (
    "name", "model.remat", "model.attention_impl", "model.attention_chunk_mib",
    "model.cpu_dense_grad", "data.dir",
    "data.manual_dir", "data.num_workers", "data.read_threads", "data.prefetch",
    "train.microbatches", "train.device_memory_gib", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.profile",
    "train.stop_check_every", "train.distributed", "train.eval_batch_size",
    # The analysis is the study's (reporting/manifest.py), not the run's.
    "analysis.equivalence_margin", "analysis.alpha")
# What differs between the runs of one comparison by design.
PAIRED_FIELDS = ("model.arch", "train.seed")


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

  @functools.cached_property
  def per_example(self) -> dict | None:
    """The final evaluation per validation image (`evaluation.per_example`), None if absent."""
    from diffvit_jax.evaluation import per_example

    return per_example.read(self.workdir)

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
  """Sets `run.size`: the study's level where it names one (analysis.level), else from the
  name ('vit_10m,v2' -> '10m'), else from the model shape."""
  unnamed: dict[tuple, list[Run]] = {}
  for run in runs:
    match = _SIZE_IN_NAME.search(run.name)
    level = run.info.get("config", {}).get("analysis", {}).get("level")
    if level:
      run.size = level
    elif match:
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

  @property
  def level(self) -> str:
    """The study's level (analysis.level, e.g. '8 fragments'); '' where the axis is size."""
    return self.runs[0].info.get("config", {}).get("analysis", {}).get("level") or ""

  def sort_key(self):
    order = list(registry.ARCHS)
    arch = order.index(self.arch) if self.arch in order else len(order)
    return (self.protocol, _size_order(self.size), self.size, arch, self.name)


def group_runs(runs: list[Run]) -> list[Group]:
  """Groups the seeds of each config, sorted by protocol, size, architecture.

  DataError naming both workdirs when one config has two runs of one seed.

  Seeds of one config are one `Group`: the group key is the run's name and
  protocol (the config name minus the seed) plus its model size. The size is
  parsed from names such as 'vit_10m,v2'; runs whose names carry none (the
  digits runs) are sized by their model shape and labelled with the parameter
  count of the smallest model of that shape, so that a ViT and the DiffViT it is
  matched with land in the same size.
  """
  assign_sizes([r for r in runs if not r.size])
  groups: dict[tuple, Group] = {}
  for run in runs:
    key = (run.protocol, run.size, run.arch, run.name)
    group = groups.setdefault(key, Group(run.protocol, run.size, run.arch, run.name, []))
    group.runs.append(run)
  for group in groups.values():
    group.runs.sort(key=lambda r: (r.seed, r.workdir))
    for first, second in zip(group.runs, group.runs[1:], strict=False):
      if first.seed == second.seed:
        raise DataError(
            f"Two runs of {group.name} ({group.protocol}, {group.size}) have seed {first.seed}: "
            f"{first.workdir} and {second.workdir}. A seed counts once in the verdict; pass one "
            "of them (or give the other another seed).")
  return sorted(groups.values(), key=Group.sort_key)


# --- Which runs may enter the verdict -------------------------------------------------------

def _flatten(node, prefix: str = "") -> dict:
  flat = {}
  for key, value in node.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def full_config(saved: dict) -> dict:
  """A recorded config, flat ('train.seed': 0), with today's defaults for fields it lacks."""
  from diffvit_jax.training import checkpointing

  return _flatten(checkpointing.config_from_saved(saved or {}).to_dict())


def config_differences(mine: dict, theirs: dict, ignore=RESULT_NEUTRAL + PAIRED_FIELDS,
                       names=("this run", "the others")) -> list[str]:
  """'field: <names[0]> has X, <names[1]> Y' for each flat field that differs, `ignore` aside."""
  out = []
  for key in sorted(set(mine) | set(theirs)):
    if key in ignore:
      continue
    a, b = mine.get(key, "<absent>"), theirs.get(key, "<absent>")
    if a != b:
      out.append(f"{key}: {names[0]} has {a!r}, {names[1]} {b!r}")
  return out


@dataclasses.dataclass(frozen=True)
class Excluded:
  run: Run
  reason: str


def _unfinished(run: Run) -> str:
  completed, total = run.info.get("completed_steps"), run.info.get("total_steps")
  if total is None:
    return "unfinished or of older code: run_info.json has no total_steps"
  if completed != total:
    return f"unfinished: {completed or 0} of {total} steps"
  eval_step = run.info.get("eval_step")
  if eval_step is not None and eval_step != total:
    return f"its last evaluation is at step {eval_step}, not at the final step {total}"
  return ""


def _nonfinite(run: Run) -> str:
  summary = run.summary()
  bad = [k for k in ("final_top1", "final_top5", "final_loss")
         if not math.isfinite(summary[k])]
  return f"non-finite final metrics ({', '.join(bad)})" if bad else ""


def admit(runs: list[Run]) -> tuple[list[Run], list[Excluded]]:
  """(the runs the verdict may use, those left out with the reason), see the module docstring.

  Config agreement is checked per protocol and size: the config most of the
  finished runs share is the reference (ties: that of the first workdir in
  sorted order), and a run of another config is left out with the fields named.

  A run is admitted to the verdict (`admit`) only when it finished
  (`completed_steps == total_steps`), its final metrics are finite, and its
  config equals that of the other runs of its protocol and size but for
  `model.arch`, `train.seed` and the fields that do not change the result
  (`RESULT_NEUTRAL`); a field the run's config lacks (older code) takes
  today's default. Every run left out is returned with its reason.
  """
  assign_sizes(runs)
  excluded, candidates = [], []
  for run in runs:
    reason = _unfinished(run) or _nonfinite(run)
    if reason:
      excluded.append(Excluded(run, reason))
    else:
      candidates.append(run)
  by_unit: dict[tuple, list[Run]] = {}
  for run in candidates:
    by_unit.setdefault((run.protocol, run.size), []).append(run)
  admitted = []
  for members in by_unit.values():
    members.sort(key=lambda r: r.workdir)
    flat = {r.workdir: full_config(r.info.get("config", {})) for r in members}
    comparable = {w: json.dumps({k: v for k, v in c.items()
                                 if k not in RESULT_NEUTRAL + PAIRED_FIELDS}, sort_keys=True,
                                default=str) for w, c in flat.items()}
    counts = collections.Counter(comparable.values())
    reference = max(members, key=lambda r: counts[comparable[r.workdir]])  # first of the most
    reference_key = comparable[reference.workdir]
    for run in members:
      if comparable[run.workdir] == reference_key:
        admitted.append(run)
      else:
        diffs = config_differences(flat[run.workdir], flat[reference.workdir],
                                   names=("this run", f"{reference.workdir}"))
        excluded.append(Excluded(run, "another config than the runs it is compared with ("
                                 + "; ".join(diffs) + ")"))
  return admitted, excluded


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


# --- launch.sh: is this workdir already the run asked for? ----------------------------------

MATCHES, NOT_FINISHED, OTHER_CONFIG = 0, 1, 3


def matches(workdir: str, config) -> tuple[int, str]:
  """(MATCHES | NOT_FINISHED | OTHER_CONFIG, a line saying why) for `config` in `workdir`."""
  path = os.path.join(workdir, RUN_INFO)
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return NOT_FINISHED, f"{workdir}: no finished run (no readable {RUN_INFO})"
  requested = _flatten(json.loads(config.to_json_best_effort()))
  diffs = config_differences(full_config(info.get("config", {})), requested,
                             ignore=RESULT_NEUTRAL, names=("the run", "the request"))
  if diffs:
    return OTHER_CONFIG, (f"{workdir} holds a run of another config ({'; '.join(diffs)}): "
                          "use another workdir, or delete it to train the requested config.")
  run = Run(workdir=workdir, info=info, scalars={}, robustness=None)
  reason = _unfinished(run)
  if reason:
    return NOT_FINISHED, f"{workdir}: {reason}"
  return MATCHES, f"{workdir}: finished, same config"


def main(argv=None) -> int:
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FlagValues()
  flags.DEFINE_string("matches", None, "A training workdir.", flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "The requested config.",
                                  flag_values=flag_values)
  argv = sys.argv if argv is None else ["runs", *argv]
  try:
    flag_values(argv)
    if not flag_values.matches or flag_values.config is None:
      raise flags.Error("--matches WORKDIR and --config are both needed")
  except flags.Error as e:
    print(f"error: {e}. Usage: python -m diffvit_jax.reporting.runs --matches WORKDIR "
          "--config CFG [--config.x=y ...]", file=sys.stderr)
    return 2
  code, line = matches(flag_values.matches, flag_values.config)
  print(line, file=sys.stderr if code == OTHER_CONFIG else sys.stdout)
  return code


if __name__ == "__main__":
  sys.exit(main())
