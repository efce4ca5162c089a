r"""CPU time per 64x64 image of each generated Tiny-ImageNet-C corruption, final JPEG save included.

  .venv/bin/python benchmarks/corruption_cost.py [--images 20]

Single thread, the evaluation's per-example generators, every severity;
prints one line per corruption: name and milliseconds per image (mean over
severities), to size data.num_workers for --mode eval_corrupted.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import data_fakes  # noqa: E402

from diffvit_jax.data import corruptions  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=20)
  args = parser.parse_args()
  images = [data_fakes.natural_image(np.random.default_rng(s)) for s in range(args.images)]
  for name in corruptions.CORRUPTIONS:
    start = time.perf_counter()
    for severity in corruptions.SEVERITIES:
      for i, image in enumerate(images):
        corruptions.apply(image, name, severity, corruptions.example_rng(name, severity, i))
    per_image = (time.perf_counter() - start) / (len(corruptions.SEVERITIES) * len(images))
    print(f"{name:18s} {per_image * 1e3:6.2f} ms")


if __name__ == "__main__":
  main()
