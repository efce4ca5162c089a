"""`./launch.sh gpu_check --dry_run`: the whole GPU check on the CPU with tiny sizes."""

import json
import math
import os
import subprocess
import sys

import pytest

from diffvit_jax.tools import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, whatever the calling test session simulates
  return subprocess.run([sys.executable, "-m", "diffvit_jax.tools.gpu_check", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  run = run_check("--dry_run", "--out", str(out))
  assert run.returncode == 0, run.stderr[-4000:]
  with open(out / "gpu_check.json") as f:
    report = json.load(f)
  return report, (out / "gpu_check.md").read_text(), run.stderr


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_section_is_there_without_errors(dry_run):
  report, _, _ = dry_run
  for name in gpu_check.SECTIONS:
    assert name in report, name
    assert "error" not in report[name], (name, report[name]["error"])
  assert report["meta"]["dry_run"] and report["meta"]["platform"] == "cpu"


def test_agreement_of_every_path_within_tolerance(dry_run):
  agreement = dry_run[0]["agreement"]
  # No cuDNN on the CPU: the output must say that 'xla' stood in for it.
  assert agreement["fused"] == "xla" and "cannot run" in agreement["note"]
  assert agreement["paths"] == ["einsum", "xla"]
  assert [r["arch"] for r in agreement["results"]] == list(gpu_check.ARCHS)
  for result in agreement["results"]:
    assert "error" not in result, result
    for impl in agreement["paths"]:
      errors = result["paths"][impl]
      for name, tolerance in agreement["tolerances"].items():
        # Above zero: the comparison saw real logits and gradients (the head starts at zero).
        assert 0 < errors[f"{name}_rel_err"] <= tolerance, (result["arch"], impl, name)
      assert errors["within_tolerance"]
    between = result["pairwise"]["einsum vs xla"]
    assert all(0 < value <= 0.2 for value in between.values()), between
    assert result["passed"]


def test_step_times_ratios_and_largest_batch(dry_run):
  steps = dry_run[0]["step_time"]
  assert [r["name"] for r in steps["results"]] == list(gpu_check.STEP_CONFIGS)
  for record in steps["results"]:
    assert "error" not in record, record
    assert record["dtype"] == "bfloat16"
    for field in ("step_ms", "images_per_sec", "compile_s", "gflops_per_image", "params"):
      assert positive(record[field]), (record["name"], field)
    assert record["mfu"] is None  # no peak FLOP/s is known for the CPU
  assert set(steps["diffvit_vit_ratio"]) == set(gpu_check.SIZES)
  assert all(positive(r) for r in steps["diffvit_vit_ratio"].values())
  searched = [r for r in steps["results"] if "largest" in r]
  assert searched, "no largest-batch search ran"
  for record in searched:
    # The CPU does not run out of memory at these sizes: the search ends at the cap.
    assert record["stopped"].startswith("cap"), record["stopped"]
    assert record["largest"]["batch"] == 16 and positive(record["largest"]["step_ms"])


def test_diffvit_forms_pipeline_training_memory_sweep(dry_run):
  report = dry_run[0]
  forms = report["diffvit_forms"]
  assert (forms["candidate"]["attention"], forms["baseline"]["attention"]) == ("xla", "einsum")
  assert positive(forms["step_time_ratio"]) and forms["agreement"]["passed"]
  assert positive(forms["agreement"]["between"]["logits_rel_diff"])
  pipeline = report["pipeline"]
  assert pipeline["source"] == "image_folder" and pipeline["image_size"] == 96
  assert positive(pipeline["images_per_sec"]) and positive(pipeline["headroom"])
  for run in report["training"]["results"]:
    assert run["finite"] and len(run["losses"]) == run["steps"] == 20
    assert run["last_loss"] < run["first_loss"], run  # a learnable task, so the loss falls
  assert "peak_bytes_in_use" in report["memory"]
  sweep = report["sweep"]
  assert sweep["complete"] and len(sweep["runs"]) == 6 and positive(sweep["hours"])
  for run in sweep["runs"]:
    assert run["steps"] == math.ceil(50 * 100_000 / run["batch"])


def test_markdown_lists_every_goal(dry_run):
  report, markdown, stderr = dry_run
  goals = [g["goal"] for g in report["goals"]]
  assert len(goals) == 9  # MFU x4, DiffViT/ViT ratio x3, pipeline, sweep
  for goal in report["goals"]:
    assert f"| {goal['goal']} | {goal['target']} |" in markdown
    assert goal["status"] in ("met", "missed", "n/a")
  # Measured where the CPU can measure; MFU has no CPU peak, so it is n/a.
  by_goal = {g["goal"]: g for g in report["goals"]}
  assert by_goal["six-run v2 sweep"]["status"] in ("met", "missed")
  assert by_goal["vit_10m,v2 bf16 MFU"]["status"] == "n/a"
  assert "dry run" in markdown and "## DiffViT 10m v2: xla against einsum" in markdown
  assert "Traceback" not in stderr  # a failed section prints one; none may fail here
  assert stderr.count("[gpu_check] step ") >= len(gpu_check.STEP_CONFIGS)  # one line each


def test_out_of_memory_is_recognised():
  assert gpu_check.is_out_of_memory(RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes."))
  assert not gpu_check.is_out_of_memory(ValueError("shapes do not match"))


def test_goals_judge_measured_values():
  report = {"step_time": {"results": [{"name": "vit_30m,v2", "mfu": 0.5},
                                      {"name": "diffvit_30m,v2", "mfu": 0.4}],
                          "diffvit_vit_ratio": {"10m": 1.05, "20m": 1.2}},
            "pipeline": {"headroom": 1.4}, "sweep": {"hours": 2.0}}
  status = {g["goal"]: g["status"] for g in gpu_check.goals(report)}
  assert status["vit_30m,v2 bf16 MFU"] == "met"
  assert status["diffvit_30m,v2 bf16 MFU"] == "missed"
  assert status["vit_10m,v2 bf16 MFU"] == "n/a"
  assert status["DiffViT/ViT step time 10m v2"] == "met"
  assert status["DiffViT/ViT step time 20m v2"] == "missed"
  assert status["DiffViT/ViT step time 30m v2"] == "n/a"
  assert status["pipeline / step images/s"] == "missed"
  assert status["six-run v2 sweep"] == "met"


def test_full_run_without_a_gpu_is_one_clear_error(tmp_path):
  run = run_check("--out", str(tmp_path), timeout=120)
  assert run.returncode == 2
  assert "--dry_run" in run.stderr and "Traceback" not in run.stderr


def test_unknown_section_is_one_clear_error(tmp_path):
  run = run_check("--dry_run", "--only", "agreement,warp_drive", "--out", str(tmp_path),
                  timeout=120)
  assert run.returncode == 2
  assert "warp_drive" in run.stderr and "Traceback" not in run.stderr
