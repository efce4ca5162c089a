r"""One training step of our JAX code against timm's PyTorch ViT: same model, batch, precision.

  .venv/bin/python benchmarks/compare_timm.py                 # 10m, both protocols, batch 32
  .venv/bin/python benchmarks/compare_timm.py --protocols=seed --sizes=10m,20m --rounds=7
  .venv/bin/python benchmarks/compare_timm.py --frameworks=jax --sizes=20m,30m  # DiffViT/ViT
  .venv/bin/python benchmarks/compare_timm.py --protocols= --digits=8,32 --batch=128
      # the digits quickstart model at 8x8 (16 tokens) and 32x32 (256 tokens)

For each protocol and size, ViT and DiffViT are built twice: ours (the jitted
`steps.train_step` of the config, through `diffvit_jax.tools.bench`, on a batch
already on the device) and timm's `VisionTransformer` from
`convert.timm_kwargs` (attn_layer 'attn' / 'diff'), holding the same weights
(`convert.to_timm`). The PyTorch step does what ours does: the config's
mixup/cutmix (timm's `Mixup`, which mixes each example with its mirror in the
batch, as ours) and label smoothing, the same loss, the gradient norm (clipped
when train.grad_clip > 0), AdamW with the config's weight-decay mask, top-1
of the batch. Not in the PyTorch step: our learning-rate schedule and
non-finite guard (a few scalar ops). PyTorch runs eagerly (no torch.compile),
as timm's train script does by default.

Timing alternates frameworks and architectures within each round (the order
flips every round), `--steps` steps per window; the JAX window waits for its
results only at its end. Reported: median ms/step and the median of the
per-round ratios JAX/PyTorch and DiffViT/ViT, so that load shared with other
processes hits both sides of each ratio alike. The last lines name the CPU kind
(model, AVX2 / AVX-512 / Arm, any XLA ISA cap) and say which cases meet their
goal for JAX ViT / timm ViT (`GOALS`). On a loaded machine `--threads=1` gives
the fairer ratio: PyTorch's OpenMP workers lose far more than XLA's pool when
descheduled.

`--threads N` pins the process to N CPUs (before JAX or PyTorch start their
thread pools) and sets PyTorch's intra-op threads to N; XLA sizes its pool
from the same affinity.
"""

import os
import sys

from absl import app, flags

_PROTOCOLS = flags.DEFINE_list("protocols", ["seed", "v2"],
                               "Protocols of configs/tiny_imagenet.py.")
_SIZES = flags.DEFINE_list("sizes", ["10m"], "Model sizes (10m, 20m, 30m).")
_DIGITS = flags.DEFINE_list("digits", [], "Image sizes at which to time configs/digits.py's "
                            "model (2x2 patches: 8 gives its 16 tokens, 32 gives 256).")
_ARCHS = flags.DEFINE_list("archs", ["vit", "diffvit"], "Architectures ('vit' and 'diffvit').")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["jax", "torch"],
                                "'jax', 'torch' or both; one alone gives DiffViT/ViT only.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size, the same for both frameworks.")
_STEPS = flags.DEFINE_integer("steps", 2, "Steps per timed window.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternation rounds; medians are over rounds.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per model first.")
_THREADS = flags.DEFINE_integer("threads", 0, "CPUs for both frameworks (0 = all available).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMPL = flags.DEFINE_string("attention_impl", "", "Override config.model.attention_impl.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere


def _cases():
  """(label, arch -> config) for every protocol x size asked for, then every digits size."""
  from configs import digits, tiny_imagenet

  cases = [(f"{protocol} {size}",
            lambda arch, p=protocol, s=size: tiny_imagenet.get_config(f"{arch}_{s},{p}"))
           for protocol in _PROTOCOLS.value for size in _SIZES.value]

  def digits_config(arch, image_size):
    config = digits.get_config(arch)
    config.data.image_size = image_size
    return config

  cases += [(f"digits {int(n)}x{int(n)}", lambda arch, n=int(n): digits_config(arch, n))
            for n in _DIGITS.value]
  return cases


class JaxStep:
  def __init__(self, config, batch_size: int):
    from diffvit_jax.tools import bench

    self._bench = bench
    trainer, self.batch = bench.build_train_step(config, batch_size)
    self.step, self.state = trainer.train_step, trainer.state

  def run(self, num_steps: int) -> float:
    self.state, seconds = self._bench.time_steps(self.step, self.state, self.batch, num_steps)
    return seconds / num_steps


class TorchStep:
  """timm's ViT, trained as `steps.train_step` trains ours."""

  def __init__(self, config, batch_size: int, params, host_batch):
    import numpy as np
    import torch
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.models.vision_transformer import VisionTransformer

    from diffvit_jax.interop import convert

    self._torch = torch
    m, t, size = config.model, config.train, config.data.image_size
    self.model = VisionTransformer(**convert.timm_kwargs(m, size)).train()
    self.model.load_state_dict(convert.to_timm(params, m, size))
    decay, no_decay = [], []
    for name, p in self.model.named_parameters():
      # Our 'matrices' mask decays exactly the Dense/Conv kernels: timm's 2-D+ '.weight's.
      is_kernel = name.endswith(".weight") and p.ndim >= 2
      (decay if t.weight_decay_mask == "all" or is_kernel else no_decay).append(p)
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8)  # optax.adamw's eps
    self.grad_clip = t.grad_clip
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
      self.mixup = Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha,
                         prob=t.mix_prob, switch_prob=0.5, mode="batch",
                         label_smoothing=t.label_smoothing, num_classes=m.num_classes)
      self.loss = SoftTargetCrossEntropy()
    else:
      self.mixup = None
      self.loss = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    self.autocast = m.dtype == "bfloat16"
    from diffvit_jax.data import normalise

    images = normalise.model_input(host_batch["image"], config.data.mean, config.data.std)
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(host_batch["label"].astype(np.int64))
    del batch_size

  def _step(self):
    torch = self._torch
    images, labels = self.images, self.labels
    targets = labels
    if self.mixup is not None:
      images, targets = self.mixup(images.clone(), labels)
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.model(images)
    loss = self.loss(logits.float(), targets)
    loss.backward()
    params = [p for p in self.model.parameters() if p.grad is not None]
    if self.grad_clip > 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
    else:
      grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    self.optimizer.step()
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss.detach(), grad_norm, accuracy

  def run(self, num_steps: int) -> float:
    import time

    start = time.perf_counter()
    for _ in range(num_steps):
      self._step()
    return (time.perf_counter() - start) / num_steps


# JAX ViT / timm ViT that a case must reach (issue 26): the seed protocol 1.2, the digits
# model at 256 tokens 1.3, anything else 1.0 (JAX no slower than timm).
GOALS = (("seed ", 1.2), ("digits 32x32", 1.3))


def goal(case: str) -> float:
  return next((g for prefix, g in GOALS if case.startswith(prefix)), 1.0)


def cpu_kind() -> str:
  """The CPU's model name and vector ISA (from /proc/cpuinfo), and any cap set in XLA_FLAGS."""
  import re

  name, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
          name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
         else "NEON/SVE" if {"asimd", "sve"} & flags else "other")
  cap = re.search(r"xla_cpu_max_isa=(\w+)", os.environ.get("XLA_FLAGS", ""))
  return f"{name}, {isa}" + (f" (XLA capped to {cap.group(1)})" if cap else "")


def paired_ratio(times: dict, a, b) -> float:
  """Median over rounds of time[a] / time[b] (both measured in the same round)."""
  import statistics

  return round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)


def main(argv):
  del argv
  if _THREADS.value > 0:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS.value])
  import datetime
  import json
  import platform
  import statistics
  import time

  import numpy as np
  import torch

  from diffvit_jax import cpu_runtime

  cpu_defaults = cpu_runtime.apply_cpu_defaults()  # as training does, before JAX starts
  import jax

  from diffvit_jax.tools import bench

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{threads} CPUs, jax {jax.__version__} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load {os.getloadavg()}, CPU defaults {cpu_defaults}", flush=True)
  print(f"CPU kind: {cpu_kind()}", flush=True)
  results = []
  for label, config_of in _cases():
    runners = {}
    for arch in _ARCHS.value:
      config = config_of(arch)
      config.model.dtype = _DTYPE.value
      if _IMPL.value:
        config.model.attention_impl = _IMPL.value
      jax_step = JaxStep(config, _BATCH.value)
      params = jax.tree_util.tree_map(np.asarray, jax_step.state.params)
      host_batch = bench.synthetic_batch(config, _BATCH.value)
      if "jax" in _FRAMEWORKS.value:
        runners[(arch, "jax")] = jax_step
      if "torch" in _FRAMEWORKS.value:
        runners[(arch, "torch")] = TorchStep(config, _BATCH.value, params, host_batch)
    for runner in runners.values():
      runner.run(_WARMUP.value)  # compiles / first-touches
    times = {key: [] for key in runners}
    cpu = {key: [] for key in runners}
    for r in range(_ROUNDS.value):
      order = list(runners) if r % 2 == 0 else list(reversed(runners))
      for key in order:
        cpu_start = time.process_time()
        times[key].append(1e3 * runners[key].run(_STEPS.value))
        cpu[key].append(1e3 * (time.process_time() - cpu_start) / _STEPS.value)
      print(f"{label} round {r}: " + ", ".join(
          f"{a}/{f} {times[(a, f)][-1]:.0f} (cpu {cpu[(a, f)][-1]:.0f})" for a, f in runners)
            + " ms/step", flush=True)
    row = dict(case=label, batch=_BATCH.value, dtype=_DTYPE.value,
               ms={f"{a}/{f}": round(statistics.median(t), 1) for (a, f), t in times.items()},
               cpu_ms={f"{a}/{f}": round(statistics.median(t), 1) for (a, f), t in cpu.items()})
    for arch in _ARCHS.value if len(_FRAMEWORKS.value) == 2 else ():
      row[f"{arch}_jax_over_torch"] = paired_ratio(times, (arch, "jax"), (arch, "torch"))
    if {"vit", "diffvit"} <= set(_ARCHS.value):
      for fw in _FRAMEWORKS.value:
        row[f"diffvit_over_vit_{fw}"] = paired_ratio(times, ("diffvit", fw), ("vit", fw))
    print(json.dumps(row), flush=True)
    results.append(row)
  print(f"load after: {os.getloadavg()}; CPU kind: {cpu_kind()}")
  for row in results:
    if "vit_jax_over_torch" in row:
      ratio, target = row["vit_jax_over_torch"], goal(row["case"])
      row["vit_goal"] = target
      print(f"{row['case']}: ViT JAX/timm {ratio:.2f} (goal <= {target}): "
            f"{'meets' if ratio <= target else 'MISSES'}; DiffViT JAX/timm "
            f"{row.get('diffvit_jax_over_torch', float('nan')):.2f}")
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
