r"""Input throughput (images/s) of the v2 train pipeline, in-process and with worker processes.

  .venv/bin/python benchmarks/pipeline_throughput.py --workers 0,2

Builds a fake Tiny ImageNet (64x64 JPEGs, TFDS array_record, like the real
build) of --num_images images unless --data_dir points at a build, then
times the train iterator of configs/tiny_imagenet.py's v2 protocol (96x96,
random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, normalisation) after a warm-up
that absorbs worker start-up. Numbers are host-side only (no device transfer).
"""

import pathlib
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]

_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data.num_workers values to measure.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "data.read_threads.", lower_bound=1)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2000, "Images in the fake build.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Batches before timing starts.", lower_bound=0)
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches timed.", lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "An existing build; default: build a fake.")


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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    workers_list = [int(w) for w in _WORKERS.value]
  except ValueError:
    raise app.UsageError(f"--workers must be integers, got {','.join(_WORKERS.value)}.") from None
  sys.path.insert(0, str(REPO))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value or build_fake(pathlib.Path(tmp), _NUM_IMAGES.value)
    for workers in workers_list:
      rate = measure(data_dir, workers, _BATCH_SIZE.value, _WARMUP.value, _BATCHES.value,
                     _READ_THREADS.value)
      print(f"num_workers={workers} read_threads={_READ_THREADS.value} "
            f"batch={_BATCH_SIZE.value}: {rate:,.0f} images/s", flush=True)


if __name__ == "__main__":  # Guarded: grain's spawned workers re-import this file.
  app.run(main)
