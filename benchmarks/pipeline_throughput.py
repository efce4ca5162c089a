r"""Input throughput (images/s) of the train pipelines, in-process and with worker processes,
against what each GPU needs.

  .venv/bin/python benchmarks/pipeline_throughput.py --workers 0,2 [--protocols v2,seed]
  .venv/bin/python benchmarks/pipeline_throughput.py --workers 1 --read_threads 1  # per core

Builds a fake Tiny ImageNet (64x64 JPEGs, TFDS array_record, like the real
build) of --num_images images unless --data_dir points at a build, then
times the train iterator of configs/tiny_imagenet.py's protocols (v2: 96x96,
random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1; seed: decode only, at 64x64)
after a warm-up that absorbs worker start-up. Batches are uint8 (the steps normalise on the
device). Numbers are host-side only (no device transfer). Then prints, per GPU and model,
the images/s the step consumes at --mfu of the GPU's peak (bench.PEAK_TFLOPS, FLOPs from
models/stats.py) and the cores that takes at the best measured rate per core.
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
_PROTOCOLS = flags.DEFINE_list("protocols", ["v2"], "Protocols of configs/tiny_imagenet.py.")
_MFU = flags.DEFINE_float("mfu", 0.5, "Model FLOP utilisation the GPUs are assumed to reach.")
GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090")
SIZES = ("10m", "30m")


def build_fake(root: pathlib.Path, num_images: int) -> str:
  sys.path.insert(0, str(REPO / "tests"))  # The fake-archive generator the tests use.
  import data_fakes

  from diffvit_jax.data import prepare
  per_class = max(1, num_images // len(data_fakes.FAKE_WNIDS))
  data_fakes.write_tiny_imagenet(root / "manual", zipped=False, num_train_per_class=per_class,
                                 num_val=8)
  prepare.build("tiny_imagenet", str(root / "data"), str(root / "manual"))
  return str(root / "data")


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its children (grain's workers) so far."""
  import psutil

  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def measure(data_dir: str, protocol: str, num_workers: int, batch_size: int, warmup: int,
            batches: int, read_threads: int) -> tuple[float, float]:
  """(images per wall second, images per CPU second of every process of the pipeline).

  The second is what one core supplies, whatever else the machine runs meanwhile."""
  from configs import tiny_imagenet
  from diffvit_jax.data import input_pipeline

  data = tiny_imagenet.get_config(f"vit_10m,{protocol}").data
  data.update(dir=data_dir, num_workers=num_workers, read_threads=read_threads)
  it = input_pipeline.create_train_iterator(data, global_batch_size=batch_size, seed=0)
  try:
    for _ in range(warmup):
      next(it)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      batch = next(it)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
  finally:
    it.close()
  size = data.image_size
  assert batch["image"].shape == (batch_size, size, size, 3) and batch["image"].dtype == "uint8"
  return batches * batch_size / elapsed, batches * batch_size / cpu


def needed(protocol: str, per_core: float) -> list[str]:
  """Lines: images/s each GPU's step takes at --mfu, and the cores to supply them."""
  from configs import tiny_imagenet
  from diffvit_jax.models import stats
  from diffvit_jax.tools import bench

  lines = []
  for size in SIZES:
    for arch in ("vit", "diffvit"):
      config = tiny_imagenet.get_config(f"{arch}_{size},{protocol}")
      gflops = stats.gflops_per_image(config.model, config.data.image_size)
      for gpu in GPUS:
        rate = _MFU.value * bench.peak_flops_per_device(gpu, config.model.dtype) / (gflops * 1e9)
        lines.append(f"  {protocol} {arch}_{size} ({gflops:.1f} GFLOP/image) on {gpu}: "
                     f"{rate:,.0f} images/s at {_MFU.value:.0%} MFU = "
                     f"{rate / per_core:,.1f} cores at {per_core:,.0f} images/s per core")
  return lines


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
    for protocol in _PROTOCOLS.value:
      best_per_core = 0.0
      for workers in workers_list:
        rate, per_core = measure(data_dir, protocol, workers, _BATCH_SIZE.value, _WARMUP.value,
                                 _BATCHES.value, _READ_THREADS.value)
        best_per_core = max(best_per_core, per_core)
        print(f"{protocol}: num_workers={workers} read_threads={_READ_THREADS.value} "
              f"batch={_BATCH_SIZE.value}: {rate:,.0f} images/s, {per_core:,.0f} images per "
              "CPU-second", flush=True)
      print("\n".join(needed(protocol, best_per_core)), flush=True)


if __name__ == "__main__":  # Guarded: grain's spawned workers re-import this file.
  app.run(main)
