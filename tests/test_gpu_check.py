"""`./launch.sh gpu_check --dry_run`: the whole GPU check on the CPU with tiny sizes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from diffvit_jax.models import attention_impl, precision, registry
from diffvit_jax.tools import gpu_check, gpu_measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILING = ("agreement", "step_time", "pipeline", "diffvit_forms", "training")


def check_command(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, whatever the calling test session simulates
  return dict(args=[sys.executable, "-m", "diffvit_jax.tools.gpu_check", *args], cwd=REPO,
              env=env, text=True)


def run_check(*args, timeout=600):
  return subprocess.run(**check_command(*args), capture_output=True, timeout=timeout)


def read(out):
  with open(out / "gpu_check.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def dry_run_out(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  run = run_check("--dry_run", "--out", str(out))
  assert run.returncode == 0, run.stderr[-4000:]
  return out, run.stderr


@pytest.fixture(scope="module")
def dry_run(dry_run_out):
  out, stderr = dry_run_out
  return read(out), (out / "gpu_check.md").read_text(), stderr


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_section_ran_without_errors(dry_run):
  report, _, stderr = dry_run
  for name in gpu_check.SECTIONS:
    assert report[name]["status"] == "done", (name, report[name])
  measured = [r for name in gpu_check.SECTIONS for r in report[name].get("results", [])
              if "seconds" in r]
  assert len(measured) > len(registry.ARCHS) * len(gpu_check.SIZES)  # step_time and more
  assert all(positive(r["estimate_s"]) for r in measured)  # each said beforehand its cost
  assert report["meta"]["dry_run"] and report["meta"]["platform"] == "cpu"
  assert "Traceback" not in stderr


def test_agreement_of_every_registered_arch_and_path(dry_run):
  rows = dry_run[0]["agreement"]["results"]
  assert {(r["arch"], r["path"]) for r in rows} == {
      (arch, impl) for arch in registry.ARCHS for impl in gpu_check.PATHS}
  for row in rows:
    if row["path"] == "cudnn":  # No cuDNN on the CPU: skipped, saying why.
      assert "cannot run here" in row["skipped"], row
      continue
    assert row["dtype"] == gpu_measure.sweep_config(f"{row['arch']}_10m,v2", {}).model.dtype
    assert all(positive(norm) for norm in row["reference_norms"])  # a non-empty comparison
    for name, tolerance in gpu_check.TOLERANCES.items():
      assert 0 <= row[f"{name}_rel_err"] <= tolerance, (row["arch"], row["path"], name)
    assert row["within_tolerance"]
  assert dry_run[0]["agreement"]["passed"]


def test_step_times_as_the_sweep_runs_them(dry_run):
  results = dry_run[0]["step_time"]["results"]
  # The sweep's archs (diffvit2 only when asked for), on one device per run.
  assert sorted(r["name"] for r in results) == sorted(
      f"{arch}_{size},v2" for size in gpu_check.SIZES for arch in gpu_check.SWEEP_ARCHS)
  assert dry_run[0]["meta"]["archs"] == ["vit", "diffvit"]
  assert dry_run[0]["meta"]["gpus_per_run"] == 1
  assert results[0]["name"] == f"{gpu_check.BASELINE}_30m,v2"  # the MFU goals' sizes first
  for record in results:
    config = gpu_measure.sweep_config(record["name"], gpu_check.DRY_RUN.overrides)
    assert record["dtype"] == config.model.dtype
    assert record["attention"] == attention_impl.resolve(config.model).impl
    assert record["precision"] == precision.policy(config.model).as_dict()
    assert record["memory_plan"]["microbatches"] == 1
    assert positive(record["memory_plan"]["bytes_per_device"])
    for field in ("step_ms", "images_per_sec", "setup_s", "gflops_per_image"):
      assert positive(record[field]), (record["name"], field)
    assert record["mfu"] is None  # no peak FLOP/s is known for the CPU
    assert (record["arch"] == gpu_check.BASELINE) != positive(record.get("vs_baseline"))


def test_largest_batch_search_ends_at_the_cap(dry_run):
  (record,) = dry_run[0]["largest_batch"]["results"]
  # The CPU does not run out of memory at these sizes, nor does its plan need microbatches.
  assert record["stopped"] == "cap 16" and record["batch"] == 16
  assert positive(record["step_ms"])
  assert record["trials"][0]["memory_plan"]["microbatches"] == 1


def test_forms_pipeline_training_memory_sweep(dry_run):
  report = dry_run[0]
  forms = report["diffvit_forms"]["results"]
  differential = [arch for arch, kind in registry.ARCHS.items()
                  if kind.differential and arch in gpu_check.SWEEP_ARCHS]
  assert [(r["arch"], r["path"]) for r in forms] == [
      (arch, impl) for arch in differential for impl in gpu_check.PATHS if impl != "einsum"]
  for row in forms:
    if row["path"] == "xla":  # what 'auto' takes on the CPU: measured by step_time
      assert row["vs_xla"] == 1 and row["from_section"] == "step_time" and row["agreement"]
    else:
      assert "cannot run here" in row["skipped"], row
  pipeline = report["pipeline"]["results"][0]
  # No Tiny ImageNet built here: generated JPEGs, with the workers a sweep run gets here.
  assert pipeline["source"] == "image_folder" and pipeline["image_size"] == 96
  workers = max(0, len(os.sched_getaffinity(0)) - 1)  # one run per device: all cores but one
  assert pipeline["num_workers"] == workers
  assert pipeline["warmup_batches"] == max(1, 3 * workers)
  assert positive(pipeline["images_per_sec"])
  (goal,) = [g for g in report["goals"] if g["goal"].startswith("pipeline")]
  fastest = max(r["images_per_sec"] for r in report["step_time"]["results"])
  assert goal["measured"] == pytest.approx(pipeline["images_per_sec"] / fastest)
  for run in report["training"]["results"]:
    assert run["finite"] and len(run["losses"]) == run["steps"] == 20
    assert run["last_loss"] < run["first_loss"], run  # a learnable task, so the loss falls
  assert [r["name"] for r in report["memory"]["results"]] == [
      r["name"] for r in report["step_time"]["results"]]
  assert "peak_bytes_in_use" in report["memory"]
  # The first planned step compiled again for a GPU description, as the rehearsal does: on
  # the GPU that is this GPU's own (the first GPU session's comparison); here XLA:CPU's plan
  # against the H100's (at these tiny sizes the GPU's workspaces outweigh the activations).
  compared = report["memory"]["deviceless"]
  first = report["memory"]["results"][0]
  assert compared["target"] == "h100" and compared["name"] == first["name"]
  assert compared["microbatches"] == first["microbatches"] and compared["ratio"] > 0
  assert compared["deviceless_breakdown"]["arguments"] == first["breakdown"]["arguments"]
  assert "compiled without the GPU for target h100" in dry_run[1]
  sweep = report["sweep"]
  assert sweep["complete"] and not sweep["missing"] and positive(sweep["hours"])
  assert len(sweep["results"]) == len(gpu_check.SWEEP_ARCHS) * len(gpu_check.SIZES)
  for run in sweep["results"]:
    assert run["steps"] == math.ceil(50 * 100_000 / run["batch"])
    assert run["seeds"] == 3  # every seed of the sweep, not one
    assert run["hours"] == pytest.approx(3 * run["steps"] * run["step_ms"] / 3.6e6)
  assert sweep["hours"] == pytest.approx(sum(run["hours"] for run in sweep["results"]))


def test_a_second_check_reads_its_programs_from_the_cache(dry_run_out):
  out, _ = dry_run_out
  first = read(out)["meta"]["compilation_cache"]
  assert first["dir"] == str(out / "xla_cache") and first["misses"] > 0
  run = run_check("--dry_run", "--only", "step_time", "--out", str(out))
  assert run.returncode == 0, run.stderr[-4000:]
  second = read(out)["meta"]["compilation_cache"]
  assert second["hits"] > 0 and second["misses"] < first["misses"]
  assert "compilation cache: " in run.stderr and "hit(s)" in run.stderr


def test_pipeline_workers_and_warm_up_follow_the_sweep(monkeypatch):
  from diffvit_jax.data import input_pipeline

  assert gpu_measure.pipeline_warmup(0) == 1 and gpu_measure.pipeline_warmup(5) == 15
  config = gpu_measure.sweep_config("vit_10m,v2", {})
  assert config.data.num_workers == "auto"
  monkeypatch.setattr(input_pipeline, "host_cores", lambda: 16)
  check = types.SimpleNamespace(devices=[object()])  # one device per run, of 1 visible
  assert gpu_check.sweep_run_workers(config, check) == 15
  config.data.num_workers = 4  # a number wins
  assert gpu_check.sweep_run_workers(config, check) == 4


def test_markdown_has_the_goals_and_a_table_per_section(dry_run):
  report, markdown, _ = dry_run
  assert "dry run" in markdown
  for goal in report["goals"]:
    assert f"| {goal['goal']} | {goal['target']} |" in markdown
  chunks = {chunk.split("\n", 1)[0]: chunk for chunk in markdown.split("\n## ")[1:]}
  assert list(chunks) == ["Goals"] + [gpu_check.TITLES[name] for name in gpu_check.SECTIONS]
  for title, chunk in chunks.items():
    assert "\n| " in chunk, title  # a table


def test_a_killed_run_leaves_its_finished_sections(tmp_path):
  stderr = tmp_path / "stderr"
  with open(stderr, "w") as f:
    process = subprocess.Popen(**check_command("--dry_run", "--only", "pipeline,training",
                                               "--out", str(tmp_path)),
                               stdout=subprocess.DEVNULL, stderr=f)
  deadline, report = time.monotonic() + 300, {}
  try:
    while report.get("pipeline", {}).get("status") != "done":
      assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()
      time.sleep(0.05)
      if (tmp_path / "gpu_check.json").exists():
        report = read(tmp_path)  # always whole: written to a temporary file, then renamed
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  assert process.returncode == -signal.SIGKILL  # killed, not finished
  report = read(tmp_path)
  assert report["pipeline"]["status"] == "done"
  assert positive(report["pipeline"]["results"][0]["images_per_sec"])
  assert report["training"]["status"] == "pending"
  assert report["agreement"] == dict(status="skipped", reason="not selected (--only)")
  assert "| image_folder |" in (tmp_path / "gpu_check.md").read_text()


def test_a_tiny_budget_skips_each_measurement_with_its_estimate(tmp_path):
  check = gpu_check.run_check(gpu_check.DRY_RUN, gpu_check.SECTIONS, 1e-3, tmp_path)
  report = read(tmp_path)
  assert report == json.loads(json.dumps(check.report, default=str))
  for name in COMPILING:
    entry = report[name]
    assert entry["status"] == "skipped" and "--budget_s" in entry["reason"], (name, entry)
    assert positive(entry["estimate_s"]), name
  assert "not measured" in report["largest_batch"]["reason"]
  assert report["memory"]["status"] == report["sweep"]["status"] == "done"
  assert all(goal["status"] == "n/a" for goal in report["goals"])


def test_estimates_follow_the_last_measured_rates(tmp_path):
  check = gpu_check.Check(gpu_check.DRY_RUN, (), 60.0, tmp_path)
  config = check.config("vit_10m,v2")
  check.learn(config, dict(setup_s=4.0, step_ms=500.0))
  assert check.estimate(config, steps=10) == pytest.approx(4.0 + 10 * 0.5)
  bigger = check.config("vit_10m,v2", {"model.depth": 2, "train.batch_size": 16})
  work = 2 * gpu_check.config_gflops(bigger) / gpu_check.config_gflops(config)
  assert check.estimate(bigger, steps=10) == pytest.approx(2 * 4.0 + work * 10 * 0.5)
  assert check.measure("x", 1e6, lambda: {})["skipped"].startswith("needs ~1000000 s")
  assert check.measure("y", 0.0, lambda: {"a": 1}, name="y")["a"] == 1
  assert "ZeroDivisionError" in check.measure("z", 0.0, lambda: 1 / 0)["error"]


def test_out_of_memory_is_recognised():
  assert gpu_measure.is_out_of_memory(RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes."))
  assert not gpu_measure.is_out_of_memory(ValueError("shapes do not match"))


def test_goals_judge_measured_values():
  report = {"step_time": {"results": [
      {"name": "vit_30m,v2", "mfu": 0.5}, {"name": "diffvit_30m,v2", "mfu": 0.4},
      {"name": "vit_10m,v2", "protocol": "v2", "images_per_sec": 1000.0},
      {"name": "vit_10m,seed", "protocol": "seed", "images_per_sec": 5000.0},
      {"name": "diffvit_10m,v2", "vs_baseline": 1.05},
      {"name": "diffvit_20m,v2", "vs_baseline": 1.2}]},
      "pipeline": {"results": [{"images_per_sec": 1400.0}]}}
  status = {g["goal"]: g["status"] for g in gpu_check.goals(report)}
  assert status["vit_30m,v2 MFU"] == "met"
  assert status["diffvit_30m,v2 MFU"] == "missed"
  assert status["vit_10m,v2 MFU"] == "n/a"
  assert status["DiffViT/ViT step time 10m v2"] == "met"
  assert status["DiffViT/ViT step time 20m v2"] == "missed"
  assert status["DiffViT/ViT step time 30m v2"] == "n/a"
  assert status["pipeline / fastest v2 step images/s"] == "missed"  # 1.4x
  # DiffViT-v2's wider queries cost more FLOPs: no step-time goal against ViT's.
  assert not any(goal.startswith("DiffViT-v2/") for goal in status)


def test_full_run_without_a_gpu_is_one_clear_error(tmp_path):
  run = run_check("--out", str(tmp_path), timeout=120)
  assert run.returncode == 2
  assert "--dry_run" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("args, named", [
    (("--archs", "vit,warp"), "warp"),
    (("--gpus_per_run", "2"), "--gpus_per_run=2"),
])
def test_bad_sweep_flags_are_one_clear_error(tmp_path, args, named):
  run = run_check("--dry_run", "--only", "sweep", *args, "--out", str(tmp_path), timeout=120)
  assert run.returncode == 2
  assert named in run.stderr and "Traceback" not in run.stderr


def test_unknown_section_is_one_clear_error(tmp_path):
  run = run_check("--dry_run", "--only", "agreement,warp_drive", "--out", str(tmp_path),
                  timeout=120)
  assert run.returncode == 2
  assert "warp_drive" in run.stderr and "Traceback" not in run.stderr
