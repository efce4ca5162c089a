r"""The sweep: protocol x sizes x archs x seeds, as a queue over this box's GPUs or SLURM.

  python -m diffvit_jax.tools.sweep [--protocol v2] [--sizes "10m 20m 30m"] \
      [--seeds "0 1 2"] [--archs vit,diffvit] [--config.x=y ...]   # plan, train, report
  python -m diffvit_jax.tools.sweep --dry_run       # only the plan
  python -m diffvit_jax.tools.sweep --status        # state, step/total, last eval, ETA
  python -m diffvit_jax.tools.sweep --slurm         # sbatch scripts: a job array + the report
  python -m diffvit_jax.tools.sweep --devices cpu:2 # two CPU slots (a rehearsal)

Each run is `python -m diffvit_jax.main --config configs/tiny_imagenet.py:<arch>_<size>,
<protocol> --config.train.seed=<k>` plus every `--config.*` given here, in
`<root>/<protocol>/<arch>_<size>/seed<k>` (its output in train.log there). Before any
training the study's design is written to `<root>/<protocol>/study.json` (reporting/
manifest.py: family, margin, alpha, planned seeds; kept on a rerun) and the plan is
printed: each run's workdir, slot, memory plan and microbatches, and on a GPU the time per
run and for the sweep from a timed warm-up (tools/sweep_plan.py). One run per slot
(`--gpus_per_run` GPUs each; slots from CUDA_VISIBLE_DEVICES as given, else
`nvidia-smi -L`); the next run starts on the first slot that frees. A run already finished
with the requested config is skipped, an unfinished one resumes, a workdir of another config
is refused (the fields named); a failed run is recorded in `<root>/<protocol>/
sweep_status.json` (exit code, log tail) and the others go on. SIGTERM/SIGINT reach every
running run (each saves and exits) and the sweep exits non-zero. At the end the report is
written from the finished runs, the failed ones are listed and the exit code is 1 if any.
"""

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # --status reads TensorBoard events

from absl import flags  # noqa: E402

from diffvit_jax import cli, cpu_runtime, files  # noqa: E402
from diffvit_jax.errors import ConfigError, UserError  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_file(name: str = "tiny_imagenet") -> str:
  """configs/<name>.py of this checkout, relative when run from the checkout."""
  path = os.path.join(REPO_DIR, "configs", f"{name}.py")
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"
LOG_TAIL_LINES = 20
POLL_S = 0.5
STATES = ("queued", "running", "finished", "skipped", "failed", "interrupted")
USAGE = __doc__.split("\n\n")[1]


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("study", "tiny_imagenet", "The config file, configs/<study>.py, taking "
                      "<arch>_<size>,<protocol>: tiny_imagenet (sizes 10m 20m 30m) or clutter "
                      "(sizes = fragments per image, protocol clutter).", flag_values=fv)
  flags.DEFINE_string("protocol", "v2", "Protocol of the config file (tiny_imagenet: v2 | seed).",
                      flag_values=fv)
  flags.DEFINE_string("sizes", "10m 20m 30m", "Model sizes, or the study's levels (spaces or "
                      "commas).", flag_values=fv)
  flags.DEFINE_string("archs", "vit diffvit", "Architectures (spaces or commas).",
                      flag_values=fv)
  flags.DEFINE_string("seeds", "0 1 2", "Seeds (spaces or commas); the verdict needs at "
                      "least 3 paired seeds.", flag_values=fv)
  flags.DEFINE_string("root", "runs/tiny_imagenet", "Runs go to ROOT/<protocol>/<arch>_<size>/"
                      "seed<k>.", flag_values=fv)
  flags.DEFINE_string("reports", "", "Where the report goes (default reports/<study>/"
                      "<protocol>).", flag_values=fv)
  flags.DEFINE_string("devices", "", "Slots: '' = the GPUs (CUDA_VISIBLE_DEVICES as given, "
                      "else nvidia-smi -L; the CPU if none), '0,1,2' = those GPUs, 'cpu:N' = N "
                      "CPU slots (JAX_PLATFORMS=cpu).", flag_values=fv)
  flags.DEFINE_integer("gpus_per_run", 1, "GPUs per run (data parallel).", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the plan only.", flag_values=fv)
  flags.DEFINE_string("target", "", "--dry_run: plan for this GPU (diffvit_jax/targets/: h100, "
                      "a100, rtx4090), compiled for it here without one; times estimated at "
                      "40% MFU.", flag_values=fv)
  flags.DEFINE_bool("status", False, "Print the state of every run and exit.", flag_values=fv)
  flags.DEFINE_bool("report", False, "Only write the report from the finished runs.",
                    flag_values=fv)
  flags.DEFINE_bool("slurm", False, "Write sbatch scripts (job array + report) and print the "
                    "commands that submit them.", flag_values=fv)
  flags.DEFINE_integer("task_id", None, "Train run number TASK_ID of the run list only (what a "
                       "SLURM array task runs), on the devices it was given.", flag_values=fv)
  flags.DEFINE_integer("cpus_per_run", 8, "--slurm: CPUs per task (the input pipeline).",
                       flag_values=fv)
  flags.DEFINE_multi_string("sbatch", [], "--slurm: an extra '#SBATCH' option for both scripts, "
                            "e.g. --sbatch=--partition=gpu --sbatch=--time=24:00:00.",
                            flag_values=fv)
  flags.DEFINE_string("python", sys.executable, "Interpreter of the training runs.",
                      flag_values=fv)
  flags.DEFINE_float("equivalence_margin", None, "The verdict's equivalence margin in points "
                     "of top-1, fixed in the study manifest before the first run (default: the "
                     "configs' analysis.equivalence_margin).", flag_values=fv)
  return fv


# --- The run list ---------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """One run of the sweep: its place in the run list, config and workdir."""

  index: int
  arch: str
  size: str
  seed: int
  workdir: str
  config_arg: str  # configs/tiny_imagenet.py:<arch>_<size>,<protocol>

  @property
  def label(self) -> str:
    return f"{self.arch}_{self.size} seed {self.seed}"

  def args(self, overrides: list[str]) -> list[str]:
    """The config flags of this run: its config, its seed, the sweep's overrides."""
    return ["--config", self.config_arg, f"--config.train.seed={self.seed}", *overrides]

  def command(self, python: str, overrides: list[str]) -> list[str]:
    return [python, "-m", "diffvit_jax.main", *self.args(overrides)[:2], "--workdir",
            self.workdir, *self.args(overrides)[2:]]


def _words(value: str, what: str) -> list[str]:
  words = [w for w in re.split(r"[\s,]+", value.strip()) if w]
  if not words:
    raise ConfigError(f"--{what} is empty; give at least one, e.g. --{what}='"
                      f"{_define_flags()[what].default}'.")
  return list(dict.fromkeys(words))


def run_list(fv) -> list[Job]:
  """protocol x sizes x archs x seeds, by size, then seed, then arch.

  So a sweep stopped early holds whole sizes and complete (ViT, DiffViT) pairs of seeds, and
  the first runs on a box's slots compile different models.
  """
  try:
    seeds = [int(s) for s in _words(fv.seeds, "seeds")]
  except ValueError:
    raise ConfigError(f"--seeds={fv.seeds!r}: seeds are integers, e.g. --seeds='0 1 2'.") from None
  if not os.path.exists(config_file(fv.study)):
    known = sorted(n[:-3] for n in os.listdir(os.path.join(REPO_DIR, "configs"))
                   if n.endswith(".py") and not n.startswith("_"))
    raise ConfigError(f"--study={fv.study}: there is no configs/{fv.study}.py; the studies are "
                      f"{', '.join(known)} (tiny_imagenet and clutter take "
                      "<arch>_<size>,<protocol>).")
  runs = []
  for size in _words(fv.sizes, "sizes"):
    for seed in seeds:
      for arch in _words(fv.archs, "archs"):
        workdir = os.path.join(fv.root, fv.protocol, f"{arch}_{size}", f"seed{seed}")
        runs.append(Job(len(runs), arch, size, seed, workdir,
                        f"{config_file(fv.study)}:{arch}_{size},{fv.protocol}"))
  return runs


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the sweep's own flags, the --config.FIELD=VALUE overrides every run gets)."""
  own, overrides = [], []
  for arg in argv:
    if arg.startswith("--config."):
      if "=" not in arg:
        raise ConfigError(f"{arg}: give config overrides as --config.FIELD=VALUE (one word).")
      if arg.split("=", 1)[0] == "--config.train.seed":
        raise ConfigError("--config.train.seed is set per run by the sweep; use --seeds.")
      overrides.append(arg)
    elif arg == "--config" or arg.startswith("--config="):
      raise ConfigError("The sweep chooses each run's config (configs/tiny_imagenet.py:"
                        "<arch>_<size>,<protocol>); use --protocol, --sizes, --archs and "
                        "--config.FIELD=VALUE overrides.")
    else:
      own.append(arg)
  return own, overrides


def build_config(config_arg: str, overrides: list[str]):
  """The ConfigDict of `config_arg` with `overrides`, as diffvit_jax.main would build it."""
  from ml_collections import config_flags

  argv = ["sweep", "--config", config_arg, *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    raise ConfigError(f"The config of the sweep's runs cannot be built from {config_arg} with "
                      f"{' '.join(overrides) or 'no overrides'}: {message.splitlines()[-1]}"
                      ) from None
  return fv.config


def build_configs(runs: list[Job], overrides: list[str], num_devices: int, *,
                  need_data: bool = True) -> dict[int, object]:
  """Each run's config (built and validated here, so a typo is one error before any run).

  The data set's presence is checked last by validation; with `need_data=False` (a plan,
  SLURM scripts written where the data is not) its absence is a note, not an error.
  """
  from diffvit_jax import config_lib
  from diffvit_jax.errors import DataError

  configs, missing = {}, None
  for run in runs:
    configs[run.index] = config = build_config(run.config_arg, [
        f"--config.train.seed={run.seed}", *overrides])
    try:
      config_lib.validate(config, mode="train", num_devices=num_devices)
    except DataError as e:
      if need_data:
        raise
      missing = str(e).splitlines()[0]
  if missing:
    print(f"Note: the runs will need their data set, which is not here: {missing}")
  return configs


# --- Slots ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Slot:
  name: str  # 'gpu 0,1', 'cpu 0', ...
  env: dict  # what the run's environment gets on this slot
  num_devices: int = 1  # devices of one run (the global batch is split over them)


def _visible_gpus() -> list[str]:
  given = os.environ.get("CUDA_VISIBLE_DEVICES")
  if given is not None:
    return [d.strip() for d in given.split(",") if d.strip()]
  if not shutil.which("nvidia-smi"):
    return []
  try:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [str(i) for i, _ in enumerate(re.findall(r"^GPU \d+", listing, re.MULTILINE))]


def slots(devices: str, gpus_per_run: int) -> tuple[list[Slot], str]:
  """(the slots runs go to, a line saying where they came from)."""
  if gpus_per_run < 1:
    raise ConfigError(f"--gpus_per_run={gpus_per_run}: must be >= 1.")
  match = re.fullmatch(r"cpu(?::(\d+))?", devices.strip())
  if match:
    count = int(match.group(1) or 1)
    if count < 1:
      raise ConfigError(f"--devices={devices!r}: at least one CPU slot, e.g. cpu:2.")
    # Each slot's runs on their own share of the cores (cpu_runtime.pin_to_share).
    shares = cpu_runtime.cpu_shares(count)
    line = f"{count} CPU slot(s) (--devices={devices}, JAX_PLATFORMS=cpu)"
    pinned = {}
    if shares[0]:
      line += ", cores " + " | ".join(",".join(map(str, s)) for s in shares)
      pinned = {i: {cpu_runtime.CPU_SHARE_ENV: f"{i}/{count}"} for i in range(count)}
    return [Slot(f"cpu {i}", {"JAX_PLATFORMS": "cpu", **pinned.get(i, {})})
            for i in range(count)], line
  if devices.strip():
    gpus, source = [d for d in re.split(r"[\s,]+", devices.strip()) if d], f"--devices={devices}"
  else:
    gpus = _visible_gpus()
    source = ("CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in os.environ else "nvidia-smi -L")
  if not gpus:
    return [Slot("cpu", {})], "no GPU visible: one run at a time on this machine's devices"
  if len(gpus) < gpus_per_run:
    raise ConfigError(f"--gpus_per_run={gpus_per_run} but only {len(gpus)} GPU(s) are there "
                      f"({source}: {','.join(gpus)}).")
  groups = [gpus[i:i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1,
                                                    gpus_per_run)]
  unused = gpus[len(groups) * gpus_per_run:]
  line = f"{len(groups)} slot(s) of {gpus_per_run} GPU(s) from {source}"
  if unused:
    line += f" (GPU {','.join(unused)} left idle: not a whole slot)"
  return [Slot(f"gpu {','.join(g)}", {"CUDA_VISIBLE_DEVICES": ",".join(g)}, len(g))
          for g in groups], line


# --- The status file ------------------------------------------------------------------------

def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def status_path(fv) -> str:
  return os.path.join(fv.root, fv.protocol, STATUS_FILE)


def manifest_path(fv) -> str:
  from diffvit_jax.reporting import manifest

  return os.path.join(fv.root, fv.protocol, manifest.MANIFEST)


def write_manifest(runs: list[Job], configs: dict, fv) -> None:
  """<root>/<protocol>/study.json, the study's design, before any run trains (kept if there)."""
  from diffvit_jax.reporting import manifest

  # A study whose family is not over model sizes names its axis (analysis.level).
  unique = {(r.size, r.arch): (configs[r.index].analysis.level or r.size, configs[r.index])
            for r in runs}
  design = manifest.from_configs(list(unique.values()), [r.seed for r in runs])
  print(manifest.write(manifest_path(fv), design)[1], flush=True)


@contextlib.contextmanager
def _locked(path: str):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def read_status(path: str) -> dict:
  """workdir -> the run's last recorded entry ({} when there is no status file)."""
  try:
    with open(path) as f:
      return {r["workdir"]: r for r in json.load(f).get("runs", [])}
  except (OSError, ValueError, KeyError, TypeError):
    return {}


def record(path: str, entries: list[dict]) -> None:
  """Merges `entries` into the status file, atomically (a SLURM array's tasks share it)."""
  with _locked(path):
    merged = read_status(path)
    merged.update({e["workdir"]: e for e in entries})
    text = json.dumps({"runs": sorted(merged.values(), key=lambda e: e["workdir"])}, indent=2)
    # Hosts of a SLURM array may share the file system: a temporary file per process.
    files.write_text(path, text, suffix=f".{socket.gethostname()}.{os.getpid()}.tmp")


def log_tail(workdir: str, lines: int = LOG_TAIL_LINES) -> list[str]:
  try:
    with open(os.path.join(workdir, LOG_FILE), "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 64 * 1024))
      text = f.read().decode(errors="replace")
  except OSError:
    return []
  return [line.rstrip("\r") for line in text.splitlines()[-lines:]]


_ERROR_LINE = re.compile(r"^(error: |\w+(Error|Exception): )")


def error_line(lines: list[str]) -> str:
  """The run's own one-line reason in its log tail ('error: ...' or an exception), or ''."""
  return next((line for line in reversed(lines) if _ERROR_LINE.match(line)), "")


def _entry(run: Job, state: str, **fields) -> dict:
  entry = dict(workdir=run.workdir, run=run.label, arch=run.arch, size=run.size, seed=run.seed,
               state=state, exit_code=None, reason="", log_tail=[], slot="", start=None,
               end=None, pid=None, host=socket.gethostname())
  entry.update(fields)
  return entry


# --- What each workdir holds ----------------------------------------------------------------

def check_workdirs(runs: list[Job], configs: dict) -> dict[int, tuple[int, str]]:
  """run index -> (reporting.runs.MATCHES | NOT_FINISHED | OTHER_CONFIG, why)."""
  from diffvit_jax.reporting import runs as runs_lib

  return {run.index: runs_lib.matches(run.workdir, configs[run.index]) for run in runs}


def _run_info(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, "run_info.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def progress(workdir: str) -> dict:
  """A run's step, total steps, last eval top-1 and its step, and seconds left.

  From run_info.json and the checkpoints directory and, for a run not finished, its
  TensorBoard events (the last step logged, its throughput and evaluation).
  """
  info = _run_info(workdir)
  total = info.get("total_steps")
  step = 0
  with contextlib.suppress(OSError):
    step = max([int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
               or [0])
  if info.get("completed_steps") is not None and total is not None:
    step = max(step, int(info["completed_steps"]))
  rate = info.get("images_per_sec")
  top1, eval_step = (info.get("final_eval") or {}).get("top1"), info.get("eval_step")
  if total is not None and info.get("completed_steps") != total:
    # A run in progress writes run_info.json per session; its events are up to date.
    from diffvit_jax.reporting import events

    scalars = {}
    with contextlib.suppress(UserError):
      scalars = events.read_scalars(workdir) if events.event_files(workdir) else {}
    if scalars.get("eval/top1"):
      top1, eval_step = scalars["eval/top1"].last, int(scalars["eval/top1"].steps[-1])
    if scalars.get("train/images_per_sec"):
      rate = scalars["train/images_per_sec"].last
      step = max(step, int(scalars["train/images_per_sec"].steps[-1]))  # the last logged
  eta, batch = None, info.get("batch_size")
  if total is not None and rate and batch and step < total:
    eta = (total - step) * batch / rate
  return dict(step=step, total=total, top1=top1, eval_step=eval_step, eta_s=eta)


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def _alive(entry: dict) -> bool:
  if entry.get("host") != socket.gethostname() or not entry.get("pid"):
    return True  # Another host's run (a SLURM task): trust the record.
  try:
    os.kill(entry["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def status_table(runs: list[Job], fv) -> str:
  """One line per run: state, step/total, last eval top-1, ETA, and why if not fine."""
  recorded = read_status(status_path(fv))
  rows = [("#", "run", "state", "step/total", "eval top-1", "ETA", "workdir / note")]
  counts = collections.Counter()
  for run in runs:
    entry = recorded.get(run.workdir)
    p = progress(run.workdir)
    info = _run_info(run.workdir)
    finished = p["total"] is not None and info.get("completed_steps") == p["total"]
    if entry:
      state = entry["state"]
      if state == "running" and not _alive(entry):
        state = "stopped"
      elif state == "skipped" and finished:  # by the last sweep: trained before
        state = "finished"
    elif finished:
      state = "finished"
    else:
      state = "unfinished" if p["step"] else "not started"
    counts[state] += 1
    note = run.workdir
    if entry and entry.get("reason") and state not in ("finished", "running"):
      note += f": {entry['reason']}"
    top1 = "-" if p["top1"] is None else f"{p['top1']:.4f} @{p['eval_step']}"
    eta = "-" if finished else _duration(p["eta_s"])
    total = "?" if p["total"] is None else p["total"]
    rows.append((str(run.index), run.label, state, f"{p['step']}/{total}", top1, eta, note))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
           for r in rows]
  summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  return "\n".join(lines + [f"{len(runs)} runs: {summary} (status file: {status_path(fv)})"])


# --- The plan -------------------------------------------------------------------------------

def _model_key(config) -> str:
  """What the compiled step depends on: the config without seed and name."""
  flat = json.loads(config.to_json_best_effort())
  flat.pop("name", None)
  flat.get("train", {}).pop("seed", None)
  return json.dumps(flat, sort_keys=True)


def plan_models(runs: list[Job], configs: dict, overrides: list[str], slot: Slot,
                python: str, need_data: bool, target: str = "",
                root: str = "") -> dict[int, dict]:
  """run index -> its model's plan (tools/sweep_plan.py in a process on `slot`'s devices).

  With `root`, the plan compiles into the sweep's compilation cache, where the runs find it.
  """
  from diffvit_jax import compilation_cache

  keys, spec = {}, {}
  for run in runs:
    key = keys[run.index] = _model_key(configs[run.index])
    item = spec.setdefault(key, dict(key=key, config=run.config_arg, overrides=overrides,
                                     time=True, num_devices=slot.num_devices, labels=[],
                                     need_data=need_data, target=target))
    if f"{run.arch}_{run.size}" not in item["labels"]:  # overrides can make sizes one model
      item["labels"].append(f"{run.arch}_{run.size}")
  env = {**os.environ, **slot.env, **(compilation_cache.env(root) if root else {}),
         **({"JAX_PLATFORMS": "cpu"} if target else {})}  # a target compiles on the CPU
  proc = subprocess.run([python, "-m", "diffvit_jax.tools.sweep_plan"], input=json.dumps(
      list(spec.values())), capture_output=True, text=True, env=env, check=False)
  lines = proc.stdout.strip().splitlines()
  try:
    result = json.loads(lines[-1])
  except (IndexError, ValueError):
    tail = "\n".join(proc.stderr.strip().splitlines()[-LOG_TAIL_LINES:])
    raise UserError(f"Planning the sweep's models failed (exit {proc.returncode}) before any "
                    f"run started; its last lines:\n{tail}") from None
  if "error" in result:
    raise ConfigError(f"Planning the sweep's models: {result['error']}")
  for item in spec.values():
    result[item["key"]]["label"] = ", ".join(item["labels"])
  return {index: result[key] for index, key in keys.items()}


def _predicted_slots(runs: list[Job], seconds: dict[int, float], n_slots: int):
  """(run index -> slot number, sweep seconds): the queue simulated with the estimates."""
  free_at = [0.0] * n_slots
  where = {}
  for run in runs:
    slot = min(range(n_slots), key=lambda s: (free_at[s], s))
    where[run.index] = slot
    free_at[slot] += seconds.get(run.index, 1.0)
  return where, max(free_at)


def input_line(num_workers, concurrent_runs: int) -> str:
  """What feeds each run: its grain workers, as data.num_workers resolves on this host."""
  from diffvit_jax.data import input_pipeline

  cores = input_pipeline.host_cores()
  workers = input_pipeline.num_workers(types.SimpleNamespace(num_workers=num_workers),
                                       concurrent_runs)
  return (f"Input: {workers} grain worker(s) per run (data.num_workers={num_workers!r}; "
          f"{cores} cores here, {max(1, concurrent_runs)} run(s) at once); the images/s one "
          "core supplies per protocol, against each GPU's need: benchmarks/RESULTS.md.")


def print_plan(runs, fv, overrides, slot_list, slot_line, plans, checks) -> None:
  todo = [r for r in runs if checks[r.index][0] == 1]  # reporting.runs.NOT_FINISHED
  seconds = {}
  for r in todo:
    plan = plans.get(r.index) or {}
    if plan.get("step_s") and plan.get("total_steps"):
      done = progress(r.workdir)["step"]
      seconds[r.index] = plan["step_s"] * max(plan["total_steps"] - done, 0)
  where, sweep_s = _predicted_slots(todo, seconds, len(slot_list))
  axes = " x ".join(f"{what} {' '.join(_words(fv[what].value, what))}"
                    for what in ("sizes", "archs", "seeds"))
  print(f"Sweep of protocol {fv.protocol}: {len(runs)} runs ({axes}), {slot_line}; "
        f"{len(todo)} to train.")
  print(f"Every run: {config_file(fv.study)}:<arch>_<size>,{fv.protocol} --config.train.seed=<k>"
        f"{' ' + ' '.join(overrides) if overrides else ''}")
  print(f"Status file: {status_path(fv)}; each run's output: <workdir>/{LOG_FILE}")
  if plans:
    print(input_line(next(iter(plans.values()))["num_workers"], min(len(slot_list), len(todo))))
  if plans:
    print("Memory plan, per distinct model and batch (its train step compiled, not run):")
    for plan in {json.dumps(p, sort_keys=True): p for p in plans.values()}.values():
      steps = plan["total_steps"]
      steps_line = (f"{steps} steps" if steps is not None else "steps unknown") + (
          f" ({plan['num_train']} training images, {plan['num_train_source']})"
          if plan["num_train"] else "")
      timing = (f"; {plan['step_s'] * 1e3:.1f} ms/step {plan.get('step_source', 'measured')} "
                f"({plan['batch'] / plan['step_s']:,.0f} images/s to supply), "
                f"{_duration(plan['step_s'] * steps) if steps else '?'} of training steps per run"
                if plan.get("step_s") else "")
      print(f"  {plan['label']}: {plan['plan']}; {steps_line}{timing}")
    if any(p.get("step_s") for p in plans.values()):
      print(f"Estimated sweep time on {len(slot_list)} slot(s): {_duration(sweep_s)} of training "
            "steps (from a timed warm-up of each model's step; evaluations and start-up add to "
            "it)")
    else:
      print("Time per run: not estimated here (it needs a timed warm-up of each model's step "
            "on a GPU; there is none on this machine).")
  rows = [("#", "run", "slot", "microbatches", "action", "workdir")]
  for r in runs:
    code, why = checks[r.index]
    action = {0: "skip (finished, same config)", 1: "train",
              3: "refused (another config)"}.get(code, "?")
    if code == 1 and progress(r.workdir)["step"]:
      action = f"resume from step {progress(r.workdir)['step']}"
    slot = slot_list[where[r.index]].name if r.index in where else "-"
    micro = str((plans.get(r.index) or {}).get("microbatches", "-"))
    rows.append((str(r.index), r.label, slot, micro, action, r.workdir))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
  for row in rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  "
          + row[-1])
  for r in runs:
    if checks[r.index][0] == 3:
      print(f"  refused: {checks[r.index][1]}")
  print("(slots as predicted; at run time each run takes the first slot that frees)",
        flush=True)


# --- The queue ------------------------------------------------------------------------------

class _Stop:
  """SIGTERM / SIGINT: forwarded to every running run; no new run starts."""

  def __init__(self):
    self.signum = None
    self.children: list[subprocess.Popen] = []

  def __call__(self, signum, frame):
    del frame
    self.signum = signum
    print(f"\n== {signal.Signals(signum).name}: forwarded to {len(self.children)} running "
          "run(s); each saves a checkpoint and exits. Waiting for them.", flush=True)
    for child in self.children:
      with contextlib.suppress(ProcessLookupError):
        child.send_signal(signum)


def run_env(slot: Slot, fv, concurrent_runs: int) -> dict[str, str]:
  """A run's environment: its slot's devices, how many runs share this host's cores (for
  data.num_workers='auto'), and the sweep's compilation cache (<root>/xla_cache)."""
  from diffvit_jax import compilation_cache
  from diffvit_jax.data import input_pipeline

  return dict(os.environ, **slot.env, **compilation_cache.env(fv.root),
              **{input_pipeline.CONCURRENT_RUNS_ENV: str(max(1, concurrent_runs))})


def _start(run: Job, slot: Slot, fv, overrides: list[str], concurrent_runs: int = 1):
  os.makedirs(run.workdir, exist_ok=True)
  log = open(os.path.join(run.workdir, LOG_FILE), "ab")  # noqa: SIM115 - closed in _finish
  command = run.command(fv.python, overrides)
  log.write(f"== sweep {_now()} on {slot.name}: {shlex.join(command)}\n".encode())
  log.flush()
  env = run_env(slot, fv, concurrent_runs)
  # A session of its own: a terminal's Ctrl-C reaches the run once, through the sweep.
  proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                          start_new_session=True)
  return proc, log


def queue(runs: list[Job], configs: dict, slot_list: list[Slot], fv, overrides: list[str],
          path: str) -> tuple[dict[int, dict], int | None]:
  """Trains `runs` over `slot_list`, one per slot.

  Returns (run index -> its final status entry, the signal that stopped the sweep or None).
  """
  from diffvit_jax.reporting import runs as runs_lib

  entries = {r.index: _entry(r, "queued") for r in runs}
  record(path, list(entries.values()))
  pending = collections.deque(runs)
  running: dict[int, tuple[Job, subprocess.Popen, object]] = {}
  stop = _Stop()
  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      for slot_index, (run, proc, log) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        log.close()
        del running[slot_index]
        stop.children.remove(proc)
        matched, why = runs_lib.matches(run.workdir, configs[run.index])
        if code == 0 and matched == runs_lib.MATCHES:
          state, reason = "finished", ""
        elif stop.signum is not None:
          state, reason = "interrupted", f"stopped by {signal.Signals(stop.signum).name}"
        else:
          state = "failed"
          reason = f"exit code {code}" if code else f"exit code 0 but {why}"
        tail = log_tail(run.workdir)
        if state != "finished" and error_line(tail):
          reason += f": {error_line(tail)}"
        entries[run.index].update(state=state, exit_code=code, reason=reason, end=_now(),
                                  log_tail=tail, pid=None)
        record(path, [entries[run.index]])
        print(f"== {state}: {run.label} on {slot_list[slot_index].name} "
              f"({reason or 'exit code 0'})", flush=True)
      if stop.signum is None:
        for slot_index, slot in enumerate(slot_list):
          if slot_index in running or not pending:
            continue
          run = pending.popleft()
          proc, log = _start(run, slot, fv, overrides, min(len(slot_list), len(runs)))
          running[slot_index] = (run, proc, log)
          stop.children.append(proc)
          entries[run.index].update(state="running", slot=slot.name, start=_now(), end=None,
                                    pid=proc.pid, exit_code=None, reason="", log_tail=[])
          record(path, [entries[run.index]])
          print(f"== started: {run.label} on {slot.name} -> {run.workdir}/{LOG_FILE}",
                flush=True)
      elif not running:
        break
      time.sleep(POLL_S)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return entries, stop.signum


# --- The report -----------------------------------------------------------------------------

def reports_dir(fv) -> str:
  return fv.reports or os.path.join("reports", fv.study, fv.protocol)


def write_report(workdirs: list[str], fv) -> int:
  if not workdirs:
    print("== no finished run: no report.")
    return 0
  command = [fv.python, "-m", "diffvit_jax.reporting.report", *workdirs, "--out",
             reports_dir(fv)]
  if os.path.exists(manifest_path(fv)):
    command += ["--manifest", manifest_path(fv)]
  print(f"== report: {shlex.join(command)}", flush=True)
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  return subprocess.run(command, env=env, check=False).returncode


def print_failed(failed: list[dict]) -> None:
  if not failed:
    return
  print(f"== {len(failed)} run(s) did not finish:", flush=True)
  for entry in failed:
    log = os.path.join(entry["workdir"], LOG_FILE)
    where = f" (log: {log})" if os.path.exists(log) else ""
    print(f"  {entry['run']}: {entry['state']}, {entry['reason']}{where}")


# --- SLURM ----------------------------------------------------------------------------------

def _common_flags(fv, overrides: list[str]) -> list[str]:
  out = [f"--study={fv.study}", f"--protocol={fv.protocol}", f"--sizes={fv.sizes}",
         f"--archs={fv.archs}", f"--seeds={fv.seeds}", f"--root={os.path.abspath(fv.root)}",
         f"--reports={os.path.abspath(reports_dir(fv))}", f"--python={fv.python}"]
  if fv.devices.startswith("cpu"):
    out.append(f"--devices={fv.devices}")
  return out + overrides


def write_slurm(runs: list[Job], fv, overrides: list[str]) -> tuple[str, str]:
  """(array script, report script) in <root>/<protocol>/slurm/."""
  directory = os.path.abspath(os.path.join(fv.root, fv.protocol, "slurm"))
  os.makedirs(directory, exist_ok=True)
  common = " ".join(shlex.quote(a) for a in _common_flags(fv, overrides))
  extra = "".join(f"#SBATCH {option}\n" for option in fv.sbatch)
  gpus = "" if fv.devices.startswith("cpu") else f"#SBATCH --gpus-per-task={fv.gpus_per_run}\n"
  repo = shlex.quote(REPO_DIR)
  array = (
      "#!/bin/bash\n"
      f"#SBATCH --job-name=diffvit_{fv.protocol}\n"
      f"#SBATCH --array=0-{len(runs) - 1}\n"
      "#SBATCH --ntasks=1\n"
      f"{gpus}#SBATCH --cpus-per-task={fv.cpus_per_run}\n"
      "#SBATCH --requeue\n"
      "#SBATCH --signal=B:TERM@120\n"
      f"#SBATCH --output={directory}/%A_%a.out\n{extra}"
      "# One task per run: SLURM_ARRAY_TASK_ID indexes the sweep's run list (python -m\n"
      "# diffvit_jax.tools.sweep --dry_run lists it). A finished run is skipped, an unfinished\n"
      "# one resumes: requeued (preemption) or resubmitted, a task continues where it stopped.\n"
      "# TERM 120 s before the time limit reaches the run through the sweep: it saves and exits.\n"
      "set -euo pipefail\n"
      f"cd {repo}\n"
      f"exec {shlex.quote(fv.python)} -m diffvit_jax.tools.sweep "
      f"--task_id=\"$SLURM_ARRAY_TASK_ID\" {common}\n")
  report = (
      "#!/bin/bash\n"
      f"#SBATCH --job-name=diffvit_{fv.protocol}_report\n"
      "#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=2\n"
      f"#SBATCH --output={directory}/report_%j.out\n{extra}"
      "# After every task of the array (afterany): the report from the finished runs, the\n"
      "# others listed (exit 1 if any).\n"
      "set -euo pipefail\n"
      f"cd {repo}\n"
      f"exec {shlex.quote(fv.python)} -m diffvit_jax.tools.sweep --report {common}\n")
  paths = os.path.join(directory, "train_array.sbatch"), os.path.join(directory, "report.sbatch")
  for path, text in zip(paths, (array, report), strict=True):
    with open(path, "w") as f:
      f.write(text)
  return paths


# --- Main -----------------------------------------------------------------------------------

def _run_main(argv: list[str]) -> int:
  fv = _define_flags()
  own, overrides = split_overrides(argv)
  if cli.parse(fv, own, prog="sweep", usage=USAGE) is None:
    return 0
  if fv.equivalence_margin is not None:  # Into every run's config, and so into the manifest.
    overrides.append(f"--config.analysis.equivalence_margin={fv.equivalence_margin}")
  if sum([fv.dry_run, fv.status, fv.slurm, fv.report, fv.task_id is not None]) > 1:
    raise ConfigError("--dry_run, --status, --slurm, --report and --task_id are exclusive.")
  if fv.target and not fv.dry_run:
    raise ConfigError("--target plans for a GPU that is not here: it goes with --dry_run.")
  runs = run_list(fv)
  path = status_path(fv)
  if fv.status:
    print(status_table(runs, fv))
    return 0
  if fv.task_id is not None:  # A SLURM array task: the devices it was given, as they are.
    if not 0 <= fv.task_id < len(runs):
      raise ConfigError(f"--task_id={fv.task_id}: the sweep has runs 0..{len(runs) - 1}.")
    runs = [runs[fv.task_id]]
    cpu = fv.devices.startswith("cpu")
    slot_list = [Slot("cpu" if cpu else "this task's devices",
                      {"JAX_PLATFORMS": "cpu"} if cpu else {}, 1 if cpu else fv.gpus_per_run)]
  else:
    slot_list, slot_line = slots(fv.devices, fv.gpus_per_run)
  configs = build_configs(runs, overrides, slot_list[0].num_devices,
                          need_data=not (fv.dry_run or fv.slurm or fv.report))
  checks = check_workdirs(runs, configs)
  if fv.slurm:
    write_manifest(runs, configs, fv)  # Before any array task trains.
    array, report = write_slurm(runs, fv, overrides)
    print(f"Wrote {array} ({len(runs)} tasks, one per run) and {report}. Submit them with\n\n"
          f"  jobid=$(sbatch --parsable {shlex.quote(array)})\n"
          f"  sbatch --dependency=afterany:${{jobid%%;*}} {shlex.quote(report)}\n\n"
          f"Follow with: python -m diffvit_jax.tools.sweep --status "
          f"{' '.join(shlex.quote(a) for a in _common_flags(fv, [])[:6])}")
    return 0
  if fv.report:
    finished = [r.workdir for r in runs if checks[r.index][0] == 0]
    others = [_entry(r, "failed" if checks[r.index][0] == 3 else "unfinished",
                     reason=checks[r.index][1], log_tail=log_tail(r.workdir))
              for r in runs if checks[r.index][0] != 0]
    code = write_report(finished, fv)
    print_failed(others)
    return 1 if others or code else 0

  plans = {}
  if fv.task_id is None:
    todo = [r for r in runs if checks[r.index][0] == 1]  # what is finished needs no plan
    plans = plan_models(todo, configs, overrides, slot_list[0], fv.python,
                        need_data=not fv.dry_run, target=fv.target,
                        root=fv.root) if todo else {}
    print_plan(runs, fv, overrides, slot_list, slot_line, plans, checks)
  if fv.dry_run:
    return 0

  lock = None
  if fv.task_id is None:  # One queue per protocol directory at a time.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = open(path + ".queue.lock", "a")  # noqa: SIM115 - held for the whole sweep
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"Another sweep is running on {os.path.dirname(path)} (it holds "
                      f"{path}.queue.lock); see its state with --status.") from None
  if fv.task_id is None:  # An array task's study.json was written with its scripts.
    write_manifest(runs, configs, fv)
  previous = read_status(path)
  settled = []
  for run in runs:
    code, why = checks[run.index]
    if code == 0:
      old = previous.get(run.workdir) or {}
      settled.append(_entry(run, "skipped", reason="finished earlier, same config",
                            start=old.get("start"), end=old.get("end"),
                            exit_code=old.get("exit_code"), slot=old.get("slot", "")))
    elif code != 1:
      settled.append(_entry(run, "failed", reason=f"refused: {why}"))
  record(path, settled)
  todo = [r for r in runs if checks[r.index][0] == 1]
  entries, signum = queue(todo, configs, slot_list, fv, overrides, path)
  results = settled + [entries[r.index] for r in todo]
  if lock is not None:
    lock.close()
  if signum is not None:
    print_failed([e for e in results if e["state"] not in ("finished", "skipped")])
    print(f"== the sweep was stopped by {signal.Signals(signum).name}; rerun the same command "
          "to resume.")
    return 128 + signum
  if fv.task_id is not None:
    print_failed([e for e in results if e["state"] not in ("finished", "skipped")])
    return next((e["exit_code"] or 1 for e in results if e["state"] == "failed"), 0)
  finished = [e["workdir"] for e in results if e["state"] in ("finished", "skipped")]
  report_code = write_report(finished, fv)
  failed = [e for e in results if e["state"] not in ("finished", "skipped")]
  print_failed(failed)
  return 1 if failed or report_code else 0


def main(argv=None) -> int:
  try:
    return _run_main(sys.argv[1:] if argv is None else list(argv))
  except UserError as e:
    return cli.report(e)


if __name__ == "__main__":
  sys.exit(main())
