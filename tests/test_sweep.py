"""The sweep rehearsed end to end on the CPU: plan, queue, a failing run, SLURM, rerun, report.

Two sizes x two archs x three seeds of tiny models (the v2 protocol's augmentation and
mixing at 16x16) on the fake official-layout Tiny ImageNet, over two CPU slots standing in
for GPUs. One run fails in training (its run_info.json is a directory, so it cannot write
it) and one workdir holds a run of another config (refused). Then the failing run's SLURM
array task trains it alone, and a rerun of the sweep trains only the refused one once its
workdir is cleared. One module fixture runs the sequence; each test checks one part.
"""

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import data_fakes
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Wide enough that DiffViT's extra parameters (lambda, head norm) are within the 0.5% that
# the verdict's parameter matching allows.
TINY = ["--config.model.width=48", "--config.model.depth=1", "--config.model.num_heads=4",
        "--config.model.mlp_dim=96", "--config.data.image_size=16", "--config.model.patch_size=8",
        "--config.model.num_classes=4", "--config.train.steps=4", "--config.train.batch_size=8",
        "--config.train.eval_batch_size=8", "--config.data.num_workers=0",
        "--config.train.log_every=2", "--config.train.eval_every=4",
        "--config.train.checkpoint_every=4"]
SIZES, ARCHS, SEEDS = ("10m", "20m"), ("vit", "diffvit"), (0, 1, 2)
FAILING = "diffvit_10m/seed1"  # fails in training
REFUSED = "vit_20m/seed2"  # holds a run of another config
TIMEOUT_S = 300


def _workdirs(runs):
  """In the sweep's order (SLURM_ARRAY_TASK_ID indexes it): size, seed, arch."""
  return [runs / f"{arch}_{size}" / f"seed{seed}"
          for size in SIZES for seed in SEEDS for arch in ARCHS]


def _sweep(root, data_dir, *args, env=None):
  command = [sys.executable, "-m", "diffvit_jax.tools.sweep", f"--root={root / 'runs'}",
             f"--reports={root / 'reports'}", f"--sizes={' '.join(SIZES)}", "--devices=cpu:2",
             *TINY, f"--config.data.dir={data_dir}", *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                        env=env)


def _in_process(root, data_dir, *args):
  """sweep.main for what starts no run (--status, --slurm): (exit code, stdout)."""
  from diffvit_jax.tools import sweep

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = sweep.main([f"--root={root / 'runs'}", f"--reports={root / 'reports'}",
                       f"--sizes={' '.join(SIZES)}", "--devices=cpu:2", *TINY,
                       f"--config.data.dir={data_dir}", *args])
  return subprocess.CompletedProcess(args, code, out.getvalue(), "")


def _status(runs):
  with open(runs / "v2" / "sweep_status.json") as f:
    return {os.path.relpath(e["workdir"], runs / "v2"): e for e in json.load(f)["runs"]}


def _status_rows(output: str) -> dict[str, list[str]]:
  """--status table: 'diffvit_10m/seed1' -> its columns."""
  rows = {}
  for line in output.splitlines():
    match = re.match(r"^\d+\s+(\w+) seed (\d+)\s+(.*)$", line)
    if match:
      rows[f"{match.group(1)}/seed{match.group(2)}"] = match.group(3).split()
  return rows


def _verdict_seeds(reports) -> dict[str, str]:
  """size -> the paired seeds of the primary endpoint (final top-1) in verdict.csv."""
  with open(reports / "verdict.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["role"] == "primary"]
  return {r["size"]: r["paired_seeds"] for r in rows if r["metric"] == "final_top1"}


def _logs(runs):
  return {str(w.relative_to(runs / "v2")): (w / "train.log").read_text()
          for w in _workdirs(runs / "v2") if (w / "train.log").exists()}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
  from diffvit_jax.data import prepare
  from diffvit_jax.tools import sweep

  root = tmp_path_factory.mktemp("sweep")
  data_fakes.write_tiny_imagenet(root / "manual", zipped=True)
  data_dir = root / "data"
  prepare.build("tiny_imagenet", str(data_dir), str(root / "manual"))
  runs = root / "runs"
  (runs / "v2" / FAILING / "run_info.json").mkdir(parents=True)
  other = sweep.build_config("configs/tiny_imagenet.py:vit_20m,v2", [
      *TINY, "--config.train.seed=2", "--config.train.steps=5"])
  (runs / "v2" / REFUSED).mkdir(parents=True)
  (runs / "v2" / REFUSED / "run_info.json").write_text(
      json.dumps({"config": json.loads(other.to_json_best_effort())}))

  out = {"root": root, "runs": runs}
  out["first"] = _sweep(root, data_dir)
  out["first_status"] = _status(runs)
  out["first_table"] = _in_process(root, data_dir, "--status")
  out["first_verdict"] = _verdict_seeds(root / "reports")
  out["first_logs"] = _logs(runs)

  # The failing run's workdir repaired, its SLURM array task trains it (and nothing else).
  (runs / "v2" / FAILING / "run_info.json").rmdir()
  out["slurm"] = _in_process(root, data_dir, "--slurm")
  slurm_dir = runs / "v2" / "slurm"
  out["bash_n"] = [subprocess.run(["bash", "-n", str(slurm_dir / name)], capture_output=True,
                                  text=True) for name in ("train_array.sbatch", "report.sbatch")]
  index = [str(w.relative_to(runs / "v2")) for w in _workdirs(runs / "v2")].index(FAILING)
  out["task"] = subprocess.run(
      ["bash", str(slurm_dir / "train_array.sbatch")], capture_output=True, text=True,
      timeout=TIMEOUT_S, env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(index)))
  out["task_logs"] = _logs(runs)

  # The refused workdir cleared: a dry run plans it, then the rerun trains only it.
  (runs / "v2" / REFUSED / "run_info.json").unlink()
  out["dry"] = _sweep(root, data_dir, "--dry_run")
  out["dry_h100"] = _sweep(root, data_dir, "--dry_run", "--target=h100")
  out["dry_logs"] = _logs(runs)
  out["rerun"] = _sweep(root, data_dir)
  out["rerun_status"] = _status(runs)
  out["rerun_table"] = _in_process(root, data_dir, "--status")
  out["rerun_verdict"] = _verdict_seeds(root / "reports")
  out["rerun_logs"] = _logs(runs)
  return out


def test_plan_is_printed_before_any_training(rehearsal):
  stdout = rehearsal["first"].stdout
  assert stdout.index("Memory plan") < stdout.index("== started")
  assert "1 microbatch(es)" in stdout and "memory is unknown" in stdout
  assert "not estimated here" in stdout  # no GPU: no timed warm-up
  # What feeds each run: data.num_workers as the runs resolve it (two slots share the cores).
  assert "Input: 0 grain worker(s) per run (data.num_workers=0;" in stdout
  assert "2 run(s) at once" in stdout
  for workdir in _workdirs(rehearsal["runs"] / "v2"):
    assert str(workdir) in stdout
  assert re.search(r"vit_20m seed 2 .*refused \(another config\)", stdout)


def test_a_failing_run_is_recorded_and_the_others_finish(rehearsal):
  first, status = rehearsal["first"], rehearsal["first_status"]
  assert first.returncode == 1, first.stdout + first.stderr
  failed = status[FAILING]
  assert failed["state"] == "failed" and failed["exit_code"] not in (0, None)
  assert any("run_info.json" in line for line in failed["log_tail"]), failed["log_tail"]
  assert "IsADirectoryError" in failed["reason"]
  refused = status[REFUSED]
  assert refused["state"] == "failed" and "another config" in refused["reason"]
  assert "train.steps" in refused["reason"]
  others = {k: e["state"] for k, e in status.items() if k not in (FAILING, REFUSED)}
  assert len(others) == 10 and set(others.values()) == {"finished"}
  tail = first.stdout[first.stdout.index("did not finish"):]
  assert "diffvit_10m seed 1" in tail and "vit_20m seed 2" in tail


def test_status_table_after_the_first_sweep(rehearsal):
  rows = _status_rows(rehearsal["first_table"].stdout)
  assert rehearsal["first_table"].returncode == 0
  assert len(rows) == 12
  assert rows[FAILING][0] == "failed" and rows[REFUSED][0] == "failed"
  for key, columns in rows.items():
    if key not in (FAILING, REFUSED):
      assert columns[:2] == ["finished", "4/4"], (key, columns)
      assert columns[2].startswith("0.") or columns[2].startswith("1.")  # a top-1


def test_report_uses_exactly_the_finished_matching_runs(rehearsal):
  # First sweep: 10m lacks DiffViT seed 1, 20m lacks ViT seed 2.
  assert rehearsal["first_verdict"] == {"10m": "0 2", "20m": "0 1"}
  assert rehearsal["rerun_verdict"] == {"10m": "0 1 2", "20m": "0 1 2"}


def test_slurm_scripts_and_one_array_task(rehearsal):
  assert rehearsal["slurm"].returncode == 0, rehearsal["slurm"].stderr
  assert "sbatch --dependency=afterany:" in rehearsal["slurm"].stdout
  for check in rehearsal["bash_n"]:
    assert check.returncode == 0, check.stderr
  script = (rehearsal["runs"] / "v2" / "slurm" / "train_array.sbatch").read_text()
  assert "#SBATCH --array=0-11" in script and "#SBATCH --requeue" in script
  assert rehearsal["task"].returncode == 0, rehearsal["task"].stdout + rehearsal["task"].stderr
  info = json.loads((rehearsal["runs"] / "v2" / FAILING / "run_info.json").read_text())
  assert (info["arch"], info["seed"], info["completed_steps"]) == ("diffvit", 1, 4)
  before, after = rehearsal["first_logs"], rehearsal["task_logs"]
  assert {k for k in after if after[k] != before.get(k)} == {FAILING}


def test_runs_read_each_others_programs_from_the_compilation_cache(rehearsal):
  infos = []
  for workdir in _workdirs(rehearsal["runs"] / "v2"):
    path = workdir / "run_info.json"
    if path.is_file():
      infos.append(json.loads(path.read_text()))
  caches = [info["compilation_cache"] for info in infos if "compilation_cache" in info]
  assert len(caches) >= 10 and all(c["dir"] for c in caches)
  assert sum(c["hits"] > 0 for c in caches) >= len(caches) - 4  # a model's later seeds hit
  assert all(info["data_workers"] == 0 for info in infos if "data_workers" in info)


def test_dry_run_trains_nothing(rehearsal):
  dry = rehearsal["dry"]
  assert dry.returncode == 0, dry.stderr
  assert re.search(r"vit_20m seed 2 .*train ", dry.stdout)
  assert dry.stdout.count("skip (finished, same config)") == 11
  assert rehearsal["dry_logs"] == rehearsal["task_logs"]
  # For a GPU that is not here: the plan compiled for it, the time estimated, not measured.
  h100 = rehearsal["dry_h100"]
  assert h100.returncode == 0, h100.stderr
  assert re.search(r"vit_20m: .*\(target h100: 75% of 79\.6 GiB\).* ms/step estimated for h100 "
                   r"at 40% MFU", h100.stdout), h100.stdout


def test_rerun_trains_only_what_is_missing(rehearsal):
  rerun, status = rehearsal["rerun"], rehearsal["rerun_status"]
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert re.findall(r"== started: (\S+ seed \d+)", rerun.stdout) == ["vit_20m seed 2"]
  assert status[REFUSED]["state"] == "finished"
  for key, entry in status.items():
    if key != REFUSED:
      assert entry["state"] == "skipped", (key, entry)
  first = rehearsal["first_status"]
  for key in first:
    if key not in (FAILING, REFUSED):  # untouched since the first sweep
      assert (status[key]["start"], status[key]["end"]) == (first[key]["start"],
                                                            first[key]["end"])
  before, after = rehearsal["dry_logs"], rehearsal["rerun_logs"]
  assert {k for k in after if after[k] != before.get(k)} == {REFUSED}
  rows = _status_rows(rehearsal["rerun_table"].stdout)
  assert {c[0] for c in rows.values()} == {"finished"} and len(rows) == 12
