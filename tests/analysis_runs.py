"""Short digits training runs shared by the analysis tests (report, robustness, maps, predict).

Trained once per test session, in-process (no interpreter start-up per run),
into a directory that every pytest-xdist worker of the session shares; a file
lock makes the first worker train and the others wait and reuse. Tests that
write into a run copy it first (`copy_run`), so the shared runs stay as trained.
"""

import fcntl
import importlib.util
import os
import shutil

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("vit", "diffvit")
SEEDS = (0, 1)
STEPS = 30
# Tiny models: the tests check the tools, not what the models learn.
OVERRIDES = dict(depth=2, width=32)


def digits_config(arch: str, seed: int):
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO, "configs", "digits.py"))
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  config = digits.get_config(arch)
  config.model.update(**OVERRIDES)
  config.train.update(steps=STEPS, log_every=5, eval_every=15, checkpoint_every=15,
                      warmup_steps=5, seed=seed)
  return config


def run_dir(root: str, arch: str, seed: int) -> str:
  return os.path.join(root, f"{arch}_seed{seed}")


def trained_runs(tmp_path_factory) -> str:
  """The root holding `<arch>_seed<seed>` for every arch and seed, trained if not yet."""
  from diffvit_jax.training import loop as train

  # The parent of the base temp dir is shared by the xdist workers of one session.
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = str(shared / "analysis_digits_runs")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      for arch in ARCHS:
        for seed in SEEDS:
          workdir = run_dir(root, arch, seed)
          if os.path.exists(os.path.join(workdir, "DONE")):
            continue
          shutil.rmtree(workdir, ignore_errors=True)
          train.train_and_evaluate(digits_config(arch, seed), workdir)
          open(os.path.join(workdir, "DONE"), "w").close()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return root


def copy_run(root: str, arch: str, seed: int, dest) -> str:
  target = os.path.join(str(dest), f"{arch}_seed{seed}")
  shutil.copytree(run_dir(root, arch, seed), target)
  return target


def rising_evals(final_top1: float, steps=(200, 400, 600, 800, 1000)) -> dict[int, dict]:
  """Validation evaluations of a made-up run that learns steadily up to `final_top1`."""
  last = steps[-1]
  return {step: dict(top1=final_top1 * step / last, top5=min(1.0, 1.6 * final_top1 * step / last),
                     loss=4.0 / (1 + step / 300)) for step in steps}


def write_synthetic_run(workdir, *, name: str, arch: str, params: int, seed: int,
                        evals: dict[int, dict], depth: int = 2, protocol: str = "v2",
                        config: dict | None = None, total_steps: int | None = None,
                        correct=None) -> str:
  """A run's files without training: run_info.json, CLU events, optionally per_example.npz.

  `evals` ({step: {'top1', 'top5', 'loss'}}) are the validation evaluations
  written as `eval/*`; train loss, throughput and (for differential archs)
  lambda per layer are made-up curves. `config` is the run_info.json config
  (default: a partial one that gives the depth and image size only). The run
  is finished unless `total_steps` is beyond its last evaluation. `correct`
  (booleans, one per validation image) is written as its per-example top-1.
  """
  import json

  from clu import metric_writers

  from diffvit_jax.models import registry

  os.makedirs(workdir)
  writer = metric_writers.SummaryWriter(str(workdir))
  for step in range(100, max(evals) + 1, 100):
    scalars = {"train/loss": 5 / (1 + step / 300) + 0.01 * (seed % 3),
               "train/images_per_sec": 1000.0 + seed}
    if registry.ARCHS[arch].lambda_per_layer is not None:
      scalars.update({f"lambda/layer_{i + 1}": 0.2 + 0.05 * i - step / 1e4 for i in range(depth)})
    writer.write_scalars(step, scalars)
  for step in sorted(evals):
    writer.write_scalars(step, {f"eval/{key}": value for key, value in evals[step].items()})
  writer.close()
  last = max(evals)
  total = last if total_steps is None else total_steps
  config = config or dict(model=dict(depth=depth), data=dict(image_size=96))
  config = {**config, "model": {**config.get("model", {}), "arch": arch},
            "train": {**config.get("train", {}), "seed": seed}}
  info = dict(name=name, arch=arch, protocol=protocol, params=params, seed=seed,
              batch_size=512, steps_per_epoch=100_000 / 512, train_seconds=3600.0,
              best_top1=max(e["top1"] for e in evals.values()), final_eval=evals[last],
              eval_step=last, total_steps=total, config=config)
  if total == last:
    info["completed_steps"] = last
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f)
  if correct is not None:
    correct = np.asarray(correct, bool)
    count = len(correct)
    np.savez(os.path.join(workdir, "per_example.npz"), step=np.int64(last),
             index=np.arange(count, dtype=np.int32), label=np.arange(count, dtype=np.int32) % 7,
             top1=correct, top5=correct, loss=np.zeros(count, np.float32))
  return str(workdir)


def correct_images(top1: float, images: int, rng) -> np.ndarray:
  """Booleans over `images` with exactly round(top1 * images) True, in random places."""
  out = np.zeros(images, bool)
  out[rng.choice(images, int(round(top1 * images)), replace=False)] = True
  return out
