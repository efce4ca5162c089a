r"""A study's design, written as `study.json` beside its runs before the first one trains.

  python -m diffvit_jax.reporting.manifest --out runs/study/study.json \
      --config configs/digits.py --archs "vit diffvit" --seeds "0 1 2 3 4" [--config.x=y ...]

The manifest names the primary endpoint, the family of comparisons (the
parameter-matched differential configs against the classic one, per size),
the equivalence margin and alpha (the configs' `analysis` section), the
planned seeds and the date. The report reads the design from it, never from
whichever runs happened to finish.
"""

import dataclasses
import datetime
import json
import os
import re
import sys

if __name__ == "__main__":  # Before JAX is imported: a report never starts a GPU backend,
  os.environ["JAX_PLATFORMS"] = "cpu"  # whatever the caller's environment says.

from diffvit_jax.errors import DataError, UserError  # noqa: E402

MANIFEST = "study.json"
PRIMARY_ENDPOINT = "final_top1"
# Largest relative parameter gap of a pair that is still compared as matched (tables too).
MATCH_TOLERANCE = 0.005


@dataclasses.dataclass(frozen=True)
class Planned:
  """One comparison of the family: config names (run_info.json 'name') and a size label."""

  protocol: str
  size: str
  baseline: str
  model: str
  baseline_arch: str
  model_arch: str


@dataclasses.dataclass(frozen=True)
class Design:
  """What study.json holds; `path` is where it was read from ('' when built here)."""

  endpoint: str
  family: tuple[Planned, ...]
  margin: float  # fraction of top-1
  alpha: float
  seeds: tuple[int, ...]
  date: str = ""
  path: str = ""

  def to_json(self) -> dict:
    return dict(primary_endpoint=self.endpoint,
                family=[dataclasses.asdict(p) for p in self.family],
                equivalence_margin_pp=round(100 * self.margin, 10), alpha=self.alpha,
                planned_seeds=list(self.seeds), date=self.date)

  def same_plan(self, other: "Design") -> bool:
    """Whether `other` asks for part of this design: the same endpoint, margin and alpha, a
    family within this one (seeds may differ: seeds beyond the plan are exploratory)."""
    return (self.endpoint == other.endpoint and abs(self.margin - other.margin) < 1e-12
            and self.alpha == other.alpha and set(other.family) <= set(self.family))


def from_configs(configs, seeds) -> Design:
  """The design of a study whose configs are `configs` ([(size label, config)], one per arch
  and size), run for `seeds`: each differential config parameter-matched with the classic
  config of its protocol and size is one comparison of the family."""
  from diffvit_jax.models import registry, stats

  by_key: dict[tuple, list] = {}
  for size, config in configs:
    by_key.setdefault((config.protocol, size), []).append(config)
  family, margins, alphas = [], set(), set()
  for (protocol, size), members in by_key.items():
    for config in members:
      margins.add(float(config.analysis.equivalence_margin))
      alphas.add(float(config.analysis.alpha))
    baselines = [c for c in members if not registry.kind(c.model.arch).differential]
    if len(baselines) != 1:
      continue
    base = baselines[0]
    base_params = stats.count_params(base.model, base.data.image_size)["total"]
    for config in members:
      if not registry.kind(config.model.arch).differential:
        continue
      params = stats.count_params(config.model, config.data.image_size)["total"]
      if abs(params / base_params - 1) <= MATCH_TOLERANCE:
        family.append(Planned(protocol, size, base.name, config.name, base.model.arch,
                              config.model.arch))
  if len(margins) > 1 or len(alphas) > 1:
    raise UserError(f"The study's configs disagree on their analysis section (margins "
                    f"{sorted(margins)} pp, alphas {sorted(alphas)}): one study has one margin "
                    "and one alpha; set them once, e.g. --config.analysis.equivalence_margin=1.0.")
  return Design(endpoint=PRIMARY_ENDPOINT, family=tuple(family), margin=margins.pop() / 100,
                alpha=alphas.pop(), seeds=tuple(sorted(set(seeds))),
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


def read(path: str) -> Design:
  try:
    with open(path) as f:
      raw = json.load(f)
    return Design(endpoint=raw["primary_endpoint"],
                  family=tuple(Planned(**p) for p in raw["family"]),
                  margin=float(raw["equivalence_margin_pp"]) / 100, alpha=float(raw["alpha"]),
                  seeds=tuple(int(s) for s in raw["planned_seeds"]), date=raw.get("date", ""),
                  path=path)
  except FileNotFoundError as e:
    raise DataError(f"{path}: no study manifest there (it is written by the sweep and by "
                    "`launch.sh study` before the first run).") from e
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is not a study manifest ({type(e).__name__}: {e}); it is "
                    "written by the sweep or `launch.sh study`, not by hand.") from e


def write(path: str, design: Design) -> tuple[Design, str]:
  """(the design in force, a line saying what happened): written if absent, else kept.

  An existing manifest is never overwritten: a rerun asking for part of its
  design (some sizes, other seeds) keeps it; a rerun with another margin,
  alpha, endpoint or more comparisons is refused (UserError), since a
  design changed after runs were seen is no longer fixed before the data.
  """
  from diffvit_jax import files

  if os.path.exists(path):
    kept = read(path)
    if not kept.same_plan(design):
      raise UserError(
          f"{path} fixes this study's design ({_summary(kept)}); this command asks for "
          f"{_summary(design)}. A design is fixed before the data and is not changed "
          "afterwards: run with the planned margin, alpha and comparisons, or start a new study "
          "elsewhere, whose runs start afresh (the sweep's --root; for `./launch.sh study`, "
          "move runs/study aside).")
    extra = sorted(set(design.seeds) - set(kept.seeds))
    note = (f"; seeds {' '.join(map(str, extra))} are beyond its planned seeds: they give an "
            "exploratory reading, the verdict stays on the planned ones" if extra else "")
    return kept, f"Study manifest {path} (written {kept.date}) kept{note}."
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  files.write_text(path, json.dumps(design.to_json(), indent=2) + "\n",
                   suffix=f".{os.getpid()}.tmp")
  return dataclasses.replace(design, path=path), f"Study manifest written: {path}."


def _summary(design: Design) -> str:
  family = ", ".join(f"{p.model} vs {p.baseline}" for p in design.family) or "no comparison"
  return (f"margin ±{100 * design.margin:g} pp, alpha {design.alpha:g}, endpoint "
          f"{design.endpoint}, family: {family}")


def find(workdirs: list[str]) -> str:
  """The one study.json two levels above every workdir (<study>/<config>/seed<k>), or ''."""
  found = {os.path.abspath(os.path.join(w, os.pardir, os.pardir, MANIFEST)) for w in workdirs}
  if len(found) == 1 and os.path.exists(next(iter(found))):
    return next(iter(found))
  return ""


def main(argv=None) -> int:
  """Writes (or keeps) the manifest of a study of one config file's archs."""
  from absl import flags

  from diffvit_jax import cli
  from diffvit_jax.tools import sweep

  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Where study.json goes.", flag_values=fv)
  flags.DEFINE_string("config", None, "A config file taking the arch as its argument.",
                      flag_values=fv)
  flags.DEFINE_string("archs", "vit diffvit", "Architectures (spaces or commas).",
                      flag_values=fv)
  flags.DEFINE_string("seeds", "0 1 2", "Planned seeds (spaces or commas).", flag_values=fv)
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    own = [a for a in argv if not a.startswith("--config.")]
    overrides = [a for a in argv if a.startswith("--config.")]
    if cli.parse(fv, own, prog="manifest", usage=__doc__.split("\n\n")[0].strip()) is None:
      return 0
    if not fv.out or not fv.config:
      raise UserError("--out and --config are both needed, e.g. --out runs/study/study.json "
                      "--config configs/digits.py.")
    try:
      seeds = [int(s) for s in re.split(r"[\s,]+", fv.seeds.strip()) if s]
    except ValueError:
      raise UserError(f"--seeds={fv.seeds!r}: seeds are integers, e.g. '0 1 2'.") from None
    archs = [a for a in re.split(r"[\s,]+", fv.archs.strip()) if a]
    configs = [sweep.build_config(f"{fv.config}:{arch}", overrides) for arch in archs]
    design = from_configs([(c.protocol, c) for c in configs], seeds)
    _, line = write(fv.out, design)
  except UserError as e:
    return cli.report(e)
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
