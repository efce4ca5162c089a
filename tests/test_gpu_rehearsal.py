"""The deviceless GPU rehearsal: the trainer's own train step compiled for NVIDIA targets.

Tiny models (seconds per compile) of every registered attention kind, both token parities
(the v2 protocol pools by average: 16 tokens; the seed protocol adds a class token: 17), on
H100 and RTX 4090 descriptions, through `trainer.compile_train_step` as training compiles.
Needs JAX's CUDA plugin, which the test set-up installs (launch.sh).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from diffvit_jax import targets
from diffvit_jax.data import sharding
from diffvit_jax.models import registry
from diffvit_jax.tools import gpu_measure, gpu_rehearsal
from diffvit_jax.training import trainer as trainer_lib

TINY = (("model.width", 64), ("model.depth", 2), ("model.num_heads", 4), ("model.mlp_dim", 128),
        ("model.patch_size", 8), ("data.image_size", 32), ("train.batch_size", 8))
PROTOCOL_TOKENS = {"v2": 16, "seed": 17}


def _case(arch, protocol, target, **extra):
  overrides = TINY + tuple((f"model.{k}", v) for k, v in extra.items())
  return gpu_rehearsal.Case(f"{arch}_10m,{protocol}", target, overrides)


# Every kind at both parities on the H100 (cuDNN at 16 tokens, 'xla' at 17); the RTX 4090
# (8.9) at both; the paths 'auto' does not pick here, once each.
CASES = [(arch, protocol, "h100", "auto") for arch in registry.ARCHS
         for protocol in PROTOCOL_TOKENS]
CASES += [(registry.BASELINE_ARCH, "v2", "rtx4090", "auto"), (max(registry.ARCHS), "seed",
                                                             "rtx4090", "auto")]
CASES += [(registry.BASELINE_ARCH, "v2", "h100", "einsum"), (max(registry.ARCHS), "seed",
                                                             "h100", "cudnn")]


@pytest.mark.parametrize("arch, protocol, target, impl", CASES)
def test_train_step_compiles_for_the_target_with_cudnn_where_the_rules_choose_it(
    arch, protocol, target, impl):
  record = gpu_rehearsal.rehearse(_case(arch, protocol, target, attention_impl=impl),
                                  seeds=3, mfu=0.4)
  if impl == "cudnn" and PROTOCOL_TOKENS[protocol] % 2:  # asked for, where it cannot train
    assert not record["compiled"] and "even token count" in record["error"]
    return
  assert record["compiled"], record.get("error")
  assert record["tokens"] == PROTOCOL_TOKENS[protocol]
  chosen = record["attention"]["impl"]
  if impl != "auto":
    assert chosen == impl
  # bfloat16, head sizes 16 / 32, no attention dropout: cuDNN exactly where the token count
  # is even (JAX's cuDNN backward needs it), one call per layer and direction.
  assert chosen == ("cudnn" if impl == "auto" and protocol == "v2" else
                    "xla" if impl == "auto" else impl)
  depth = record["depth"]
  expected = depth if chosen == "cudnn" else 0
  assert record["cudnn_calls"] == dict(forward=expected, backward=expected)
  if protocol == "seed" and impl == "auto":
    assert "even" in record["attention"]["reason"]
  plan = record["memory_plan"]
  assert plan["fits"] and plan["device_bytes_source"].startswith(f"target {target}")
  assert any("queued input batches" in name for name in plan["reserved"])
  assert record["roofline_ms"] > 0 and record["sweep_gpu_hours"] > 0
  json.dumps(record)
  table = gpu_rehearsal.markdown([record], dict(jax=jax.__version__, seeds=3, mfu=0.4,
                                                elapsed_s=1.0, command="test"))
  assert f"| {record['config']} | {target} | {chosen} |" in table


def test_gpu_plan_needs_fewer_bytes_than_xla_cpu_for_the_same_step():
  case = _case("vit", "v2", "h100", attention_impl="xla")
  case = gpu_rehearsal.Case(case.config_name, case.target,
                            case.overrides + (("train.batch_size", 64),))
  _, gpu_step, total = gpu_rehearsal.compile_case(case)
  config = gpu_measure.sweep_config(case.config_name, dict(case.overrides))
  cpu_step = trainer_lib.compile_train_step(
      config, sharding.make_mesh(jax.devices("cpu")[:1]), total, num_train_examples=100_000)
  gpu, cpu = gpu_step.memory_plan, cpu_step.memory_plan
  assert gpu.breakdown["arguments"] == cpu.breakdown["arguments"]  # the same step
  assert gpu.bytes_per_device < cpu.bytes_per_device
  assert gpu.breakdown["temporaries"] < cpu.breakdown["temporaries"]


def test_targets_parse_and_unknown_names_are_one_error():
  for name in targets.NAMES:
    target = targets.load(name)
    assert target.compute_capability >= (8, 0) and target.memory_bytes > 16 * 2**30
    assert targets.devices(name)[0].device_kind == target.device_kind
  assert {"h100", "a100", "rtx4090"} <= set(targets.NAMES)
  with pytest.raises(Exception, match="Unknown GPU target 'v100'.*h100"):
    targets.load("v100")


def test_describe_plans_from_the_target_compile():
  overrides = [f"--config.{field}={value}" for field, value in TINY]
  result = subprocess.run(
      [sys.executable, "-m", "diffvit_jax.tools.describe", "--config",
       "configs/tiny_imagenet.py:diffvit_10m,v2", "--memory", "--target", "rtx4090",
       *overrides], capture_output=True, text=True, check=False,
      env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})  # as a user runs it
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(result.stdout.strip().splitlines()[-1])["memory_plan"]
  assert plan["device_bytes_source"].startswith("target rtx4090")
  assert plan["device_bytes"] == int(0.75 * targets.load("rtx4090").memory_bytes)
  assert "Memory plan:" in result.stdout and "Time estimate:" in result.stdout


def test_the_environment_holds_one_cuda_build(monkeypatch):
  """The test set-up's plugin loads the cuDNN of its own build; a mixed venv is named."""
  assert targets.cuda_env_problem() is None
  import importlib.metadata

  class Dist:
    def __init__(self, name):
      self.metadata = {"Name": name}

  mixed = [Dist("jax-cuda12-plugin"), Dist("nvidia-cudnn-cu13")]
  monkeypatch.setattr(importlib.metadata, "distributions", lambda: mixed)
  assert "mixes CUDA builds" in targets.cuda_env_problem()
