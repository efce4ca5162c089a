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
