r"""Input throughput (images/s) of the v2 train pipeline, in-process and with worker processes.

  .venv/bin/python benchmarks/pipeline_throughput.py --workers 0,2

Builds a fake Tiny ImageNet (64x64 JPEGs, TFDS array_record, like the real
build) of --num_images images unless --data_dir points at a build, then
times the train iterator of configs/tiny_imagenet.py's v2 protocol (96x96,
random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, normalisation) after a warm-up
that absorbs worker start-up. Numbers are host-side only (no device transfer).
"""

import argparse
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def build_fake(root: pathlib.Path, num_images: int) -> str:
  sys.path.insert(0, str(REPO / "tests"))  # The fake-archive generator the tests use.
  import data_fakes

  from diffvit_jax.data import prepare
  per_class = max(1, num_images // len(data_fakes.FAKE_WNIDS))
  data_fakes.write_tiny_imagenet(root / "manual", zipped=False, num_train_per_class=per_class,
                                 num_val=8)
  prepare.build("tiny_imagenet", str(root / "data"), str(root / "manual"))
  return str(root / "data")


def measure(data_dir: str, num_workers: int, batch_size: int, warmup: int, batches: int,
            read_threads: int) -> float:
  from configs import tiny_imagenet
  from diffvit_jax.data import input_pipeline

  data = tiny_imagenet.get_config("vit_10m,v2").data
  data.update(dir=data_dir, num_workers=num_workers, read_threads=read_threads)
  it = input_pipeline.create_train_iterator(data, global_batch_size=batch_size, seed=0)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  assert batch["image"].shape == (batch_size, 96, 96, 3)
  return batches * batch_size / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", default="0,2", help="Comma-separated data.num_workers values.")
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--data_dir", default="", help="An existing build; default: build a fake.")
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or build_fake(pathlib.Path(tmp), args.num_images)
    for workers in (int(w) for w in args.workers.split(",")):
      rate = measure(data_dir, workers, args.batch_size, args.warmup, args.batches,
                     args.read_threads)
      print(f"num_workers={workers} read_threads={args.read_threads} "
            f"batch={args.batch_size}: {rate:,.0f} images/s", flush=True)


if __name__ == "__main__":  # Guarded: grain's spawned workers re-import this file.
  main()
