r"""Coverage of the verdict's intervals and type I error of the seed procedure, by simulation.

  .venv/bin/python benchmarks/verdict_coverage.py     # ~4 min on 2 cores

The scenarios are the tests' (tests/test_verdict.py): seed noise dominating (1000 images) and
images consistently favouring one model (360 images), no true difference; the numbers go to
benchmarks/RESULTS.md.
"""

import math
import os
import sys
import time

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from test_verdict import _image_effects, _seed_noise  # noqa: E402

from diffvit_jax.reporting import verdict  # noqa: E402


def shared_bootstrap(study, rng, resamples=500):
  """Seeds resampled, one set of image indices shared by all seeds per replicate."""
  n, m = study.shape
  seeds = rng.integers(0, n, (resamples, n))
  images = rng.integers(0, m, (resamples, m))
  per_image = study[seeds].mean(axis=1)
  means = np.take_along_axis(per_image, images, axis=1).mean(axis=1)
  return np.quantile(means, [0.025, 0.975])


def independent_bootstrap(study, rng, resamples=500):
  """The former two-level bootstrap: seeds, then each drawn seed's images independently."""
  n, m = study.shape
  seeds = rng.integers(0, n, (resamples, n))
  images = rng.integers(0, m, (resamples, n, m))
  means = np.take_along_axis(study[seeds], images, axis=2).mean(axis=(1, 2))
  return np.quantile(means, [0.025, 0.975])


def covered(bounds) -> float:
  bounds = np.asarray(bounds)
  return float(np.mean((bounds[:, 0] <= 0) & (0 <= bounds[:, 1])))


def main():
  start = time.time()
  rng = np.random.default_rng(2024)
  for name, scenario in (("seed noise dominates (1000 images)", _seed_noise),
                         ("images favour one model (360 images)", _image_effects)):
    for n in (3, 5):
      d = scenario(rng, 2000, n)
      _, low, high, _ = verdict.crossed_interval(d)
      per_seed = d.mean(-1)
      half = stats.t.ppf(0.975, n - 1) * per_seed.std(-1, ddof=1) / math.sqrt(n)
      some = d[:300].astype(np.float32)
      shared = covered([shared_bootstrap(s, rng) for s in some])
      independent = covered([independent_bootstrap(s, rng) for s in some])
      print(f"{name}, {n} seeds: seeds x images {covered(np.stack([low, high], 1)):.3f} "
            f"(2000 studies); paired t {np.mean(np.abs(per_seed.mean(-1)) <= half):.3f}; "
            f"bootstrap seeds + shared images {shared:.3f}, two-level bootstrap (images per "
            f"seed) {independent:.3f} (300 studies, 500 resamples)")
  rng = np.random.default_rng(11)
  d = rng.normal(0, 0.014, (20_000, 3, 8))
  p = stats.ttest_1samp(d[..., :3], 0, axis=-1).pvalue
  p8 = stats.ttest_1samp(d, 0, axis=-1).pvalue
  family = np.mean([min(verdict.holm(row)) < 0.05 for row in p])
  print(f"type I error, 20000 studies, no difference: planned 3 seeds {np.mean(p[:, 0] < 0.05):.4f}"
        f"; Holm over 3 sizes (any) {family:.4f}; look at 3 then at 8 seeds "
        f"{np.mean((p[:, 0] < 0.05) | (p8[:, 0] < 0.05)):.4f}")
  print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
