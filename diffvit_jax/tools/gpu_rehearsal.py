r"""The sweep's experiments compiled for NVIDIA GPUs on a machine without one.

  ./launch.sh gpu_rehearsal [--targets h100,a100,rtx4090] [--protocols v2,seed]
      [--archs vit,diffvit,diffvit2] [--sizes 10m,20m,30m] [--out benchmarks] [--mfu 0.4]

For each experiment as the sweep runs it (one model per GPU at the config's global batch) and
each target GPU (diffvit_jax/targets/), the real train step is compiled through the trainer's
own `compile_train_step`: the attention path the rules choose for that GPU, the config's dtype,
the microbatches the memory plan chooses from that GPU's memory. Per case: the path and why,
compiled or the error, cuDNN attention calls in the optimized HLO, XLA's memory analysis and
the plan, FLOPs, the roofline lower bound of the step time and the sweep's GPU-hours at `--mfu`.
Writes <out>/gpu_rehearsal.{json,md} after every case. A compile without a GPU cannot tell
speed, cuDNN's graph, autotuned GEMMs or workspace sizes: `gpu_check` measures those.
"""

import os

if __name__ == "__main__":  # before JAX starts: the CUDA plugin's cuInit fails without a GPU
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from diffvit_jax import config_lib, files, targets  # noqa: E402
from diffvit_jax.errors import ConfigError, UserError  # noqa: E402


def _define_flags() -> None:
  """The command's flags, defined only when it runs (gpu_check imports this module)."""
  flags.DEFINE_string("targets", "h100,a100,rtx4090", "GPU targets (diffvit_jax/targets).")
  flags.DEFINE_string("protocols", "v2,seed", "Protocols of configs/tiny_imagenet.py.")
  flags.DEFINE_string("archs", "", "Attention kinds (default: every registered one).")
  flags.DEFINE_string("sizes", ",".join(config_lib.MODEL_SIZES), "Model sizes.")
  flags.DEFINE_integer("seeds", 3, "Seeds per experiment, for the sweep's GPU-hours.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for the GPU-hours.")
  flags.DEFINE_string("out", "benchmarks", "Folder for gpu_rehearsal.{json,md}.")


CUDNN_FORWARD, CUDNN_BACKWARD = '"__cudnn$fmhaSoftmax"', '"__cudnn$fmhaSoftmaxBackward"'


@dataclasses.dataclass(frozen=True)
class Case:
  config_name: str  # configs/tiny_imagenet.py:<config_name>
  target: str
  overrides: tuple = ()  # dotted config fields, for the test suite's tiny models


def cudnn_calls(hlo_text: str) -> dict:
  """cuDNN flash-attention custom calls in optimized HLO: forward and backward."""
  return dict(forward=hlo_text.count(CUDNN_FORWARD), backward=hlo_text.count(CUDNN_BACKWARD))


def attention_forms(config) -> dict:
  """Attention GFLOP per image (forward + backward, 3x the forward's two products) of each
  form that can run the config's kind: 'counted' is what models/stats.py counts (DiffViT:
  A1 - lambda A2 formed before one value product, the 'xla' path), 'cudnn' the fused call
  as run (DiffViT: q/k zero-padded to 2d, v repeated: both products at 2d), and where q/k
  are padded, 'cudnn_mla' the form cuDNN's MLA would run on Hopper (q/k at d; not built)."""
  from diffvit_jax.models import registry, stats

  m = config.model
  tokens, kind = stats.num_tokens(m, config.data.image_size), registry.kind(m.arch)
  per_width = 6 * m.depth * tokens**2 / 1e9  # GFLOP per unit of product width
  qk, v = kind.fused_head_dims(m)
  forms = dict(counted=per_width * (kind.qk_width_factor * m.width + m.width),
               cudnn=per_width * m.num_heads * (qk + v))
  natural = kind.qk_width_factor * m.width // m.num_heads  # the kind's own q/k head size
  if qk > natural:  # zero-padded for the fused call
    forms["cudnn_mla"] = per_width * m.num_heads * (natural + v)
  return forms


def compile_case(case: Case, num_train_examples: int = 100_000):
  """(config, the CompiledStep) of `case` on its target's abstract device."""
  from diffvit_jax.data import sharding
  from diffvit_jax.tools import gpu_measure
  from diffvit_jax.training import optim
  from diffvit_jax.training import trainer as trainer_lib

  config = gpu_measure.sweep_config(case.config_name, dict(case.overrides))
  target = targets.load(case.target)
  total = optim.derive_recipe(config.train, num_train_examples).total_steps
  step = trainer_lib.compile_train_step(
      config, sharding.make_mesh(targets.devices(case.target)), total,
      num_train_examples=num_train_examples, target=target)
  return config, step, total


def rehearse(case: Case, seeds: int, mfu: float) -> dict:
  """One case's record (module docstring); an error is recorded, never raised."""
  from diffvit_jax.models import stats

  target = targets.load(case.target)
  record = dict(config=case.config_name, target=case.target, device_kind=target.device_kind)
  start = time.perf_counter()
  try:
    config, step, total = compile_case(case)
  except (ConfigError, UserError, NotImplementedError, ValueError, RuntimeError) as e:
    lines = str(e).strip().splitlines()
    return dict(record, compiled=False, seconds=time.perf_counter() - start,
                error=f"{type(e).__name__}: {lines[0] if lines else ''}")
  plan = step.memory_plan
  flops = config.train.batch_size * stats.gflops_per_image(config.model, config.data.image_size)
  flops *= 1e9
  peak = target.peak_flops(config.model.dtype)
  moved = plan.breakdown["arguments"] + plan.breakdown["outputs"]  # read and written once
  roofline = max(flops / peak if peak else 0.0, moved / target.memory_bandwidth)
  hours = None if not peak else seeds * total * flops / (peak * mfu) / 3600
  return dict(
      record, compiled=True, seconds=time.perf_counter() - start, arch=config.model.arch,
      dtype=config.model.dtype, batch=config.train.batch_size,
      tokens=stats.num_tokens(config.model, config.data.image_size), depth=config.model.depth,
      attention=step.attention.as_dict(), cudnn_calls=cudnn_calls(step.train_step.as_text()),
      microbatches=plan.microbatches, memory_plan=plan.as_dict(), step_tflop=flops / 1e12,
      attention_gflop_per_image=attention_forms(config),
      peak_tflops=None if not peak else peak / 1e12, roofline_ms=1e3 * roofline,
      total_steps=total, seeds=seeds, mfu=mfu, sweep_gpu_hours=hours)


def markdown(records: list[dict], meta: dict) -> str:
  from diffvit_jax.reporting import tables
  from diffvit_jax.training import memory

  rows = []
  for r in records:
    if not r["compiled"]:
      rows.append([r["config"], r["target"], "error", r["error"], "", "", "", "", ""])
      continue
    plan, calls = r["memory_plan"], r["cudnn_calls"]
    rows.append([
        r["config"], r["target"], r["attention"]["impl"],
        f"{calls['forward']}/{calls['backward']}",
        f"{plan['breakdown']['temporaries'] / 2**30:.2f}",
        f"{plan['bytes_per_device'] / 2**30:.2f} of {plan['budget'] / 2**30:.1f}",
        str(r["microbatches"]), f"{r['step_tflop']:.1f} / {r['roofline_ms']:.0f}",
        "n/a" if r["sweep_gpu_hours"] is None else f"{r['sweep_gpu_hours']:.2g}"])
  failed = [r for r in records if not r["compiled"]]
  header = ["config", "target", "attention", "cuDNN fwd/bwd", "temp GiB",
            "step GiB of budget", "microbatches", "TFLOP / roofline ms", "GPU-h"]
  reasons = sorted({(r["config"].split(",")[-1], r["attention"]["reason"].split(" [")[0])
                    for r in records if r["compiled"] and r["attention"]["impl"] != "cudnn"})
  hours = {}
  for r in records:
    if r["compiled"] and r["sweep_gpu_hours"] is not None:
      key = (r["config"].split(",")[-1], r["target"])
      hours[key] = hours.get(key, 0.0) + r["sweep_gpu_hours"]
  forms = {r["config"]: r["attention_gflop_per_image"] for r in records
           if r["compiled"] and r["attention"]["impl"] == "cudnn"}
  form_rows = [[name, *(f"{f.get(k, math.nan):.2f}" for k in ("counted", "cudnn", "cudnn_mla"))]
               for name, f in forms.items() if f["cudnn"] != f["counted"]]
  return "\n".join([
      "# GPU rehearsal (deviceless compile)", "",
      f"{len(records) - len(failed)} of {len(records)} cases compiled; jax {meta['jax']}; "
      f"{meta['elapsed_s']:.0f} s. Command: `{meta['command']}`.", "",
      "Compiled without a GPU for each target's description (diffvit_jax/targets/): cuDNN built "
      "no graph, GEMMs were not autotuned, workspaces were not sized (the plan reserves "
      f"{memory.GPU_WORKSPACE_RESERVE / 2**20:.0f} MiB for them). Budget: the target's memory "
      "as XLA's client takes it (75%), less 10% and the queued input batches. TFLOP: model "
      "FLOPs of one step (models/stats.py); "
      "roofline: the larger of TFLOP at the peak dense rate and the state read and written at "
      f"the memory bandwidth, a lower bound. GPU-h: {meta['seeds']} seeds at {meta['mfu']:.0%} "
      "MFU.", "",
      tables.markdown_table(header, rows), "",
      *(f"- not cuDNN ({protocol}): {reason}" for protocol, reason in reasons), "",
      f"The sweep's GPU-hours at {meta['mfu']:.0%} MFU, {meta['seeds']} seeds of every case "
      "above: " + "; ".join(f"{protocol} on {target} {h:.2g}"
                           for (protocol, target), h in sorted(hours.items())) + ".", "",
      "Attention GFLOP per image (forward + backward) of each differential config that runs "
      "cuDNN, by form: as counted (A1 - lambda A2 before one value product, the 'xla' "
      "path), the cuDNN call as run (q/k zero-padded to 2d) and cuDNN's MLA form on Hopper "
      "(q/k at d; compiles for the H100 here, not built: its graph is untested on a GPU).", "",
      tables.markdown_table(["config", "counted", "cuDNN (padded)", "cuDNN MLA"], form_rows),
      ""])


def cases(targets_: str, protocols: str, archs: str, sizes: str) -> list[Case]:
  from diffvit_jax.models import registry

  archs = [a for a in archs.split(",") if a] or list(registry.ARCHS)
  unknown = [a for a in archs if a not in registry.ARCHS]
  unknown += [s for s in sizes.split(",") if s not in config_lib.MODEL_SIZES]
  if unknown:
    raise UserError(f"Unknown arch or size {unknown}: archs {tuple(registry.ARCHS)}, sizes "
                    f"{tuple(config_lib.MODEL_SIZES)}.")
  return [Case(f"{arch}_{size},{protocol}", target.name)
          for protocol in protocols.split(",") for size in sizes.split(",")
          for arch in archs for target in targets.parse(targets_)]


def main(argv):
  del argv
  import jax

  fv = flags.FLAGS
  try:
    todo = cases(fv.targets, fv.protocols, fv.archs, fv.sizes)
    for name in {case.target for case in todo}:
      targets.devices(name)  # the plugin and each target file, checked before any work
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  out = pathlib.Path(fv.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(jax=jax.__version__, seeds=fv.seeds, mfu=fv.mfu, elapsed_s=0.0,
              command="python -m diffvit_jax.tools.gpu_rehearsal " + " ".join(sys.argv[1:]))
  records, start = [], time.perf_counter()
  for i, case in enumerate(todo, 1):
    record = rehearse(case, fv.seeds, fv.mfu)
    records.append(record)
    what = (f"{record['attention']['impl']}, {record['microbatches']} microbatch(es)"
            if record["compiled"] else record["error"])
    print(f"[{i}/{len(todo)}] {case.config_name} on {case.target}: {what} "
          f"({record['seconds']:.0f} s)", flush=True)
    meta["elapsed_s"] = time.perf_counter() - start
    files.write_text(str(out / "gpu_rehearsal.json"),
                     json.dumps(dict(meta=meta, cases=records), indent=1) + "\n")
    files.write_text(str(out / "gpu_rehearsal.md"), markdown(records, meta))
  print(f"wrote {out / 'gpu_rehearsal.md'} and .json")
  sys.exit(0 if all(r["compiled"] for r in records) else 1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
