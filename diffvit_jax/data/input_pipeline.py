"""The input pipeline the trainer calls: dataset info, train and eval iterators (grain).
"""

import os
from collections.abc import Iterable

import grain
import numpy as np

from diffvit_jax.data import corruptions, preprocess, sources
from diffvit_jax.data.sources import DatasetInfo
from diffvit_jax.errors import ConfigError, DataError

__all__ = ["DatasetInfo", "create_eval_iterator", "create_train_iterator", "get_dataset_info",
           "num_workers"]

# Set by the sweep for each run it starts: how many runs it trains on this host at once.
CONCURRENT_RUNS_ENV = "DIFFVIT_CONCURRENT_RUNS"


def host_cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. a SLURM or cgroup cpuset)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def num_workers(data, concurrent_runs: int | None = None) -> int:
  """`data.num_workers` as a count of grain worker processes (0: decode in-process).

  'auto': the host's cores shared among the runs the sweep trains on it at once
  (`concurrent_runs`, default DIFFVIT_CONCURRENT_RUNS, 1 outside a sweep), less one
  core for the training process itself. A number is used as it is.
  """
  value = data.num_workers
  if isinstance(value, str) and value.strip() == "auto":
    if concurrent_runs is None:
      try:
        concurrent_runs = int(os.environ.get(CONCURRENT_RUNS_ENV, "1"))
      except ValueError:
        concurrent_runs = 1
    return max(0, host_cores() // max(1, concurrent_runs) - 1)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ConfigError(f"config.data.num_workers: must be 'auto' or an integer >= 0 (grain "
                      f"worker processes; 0 decodes in the training process), got {value!r}.")
  return value


def get_dataset_info(data) -> DatasetInfo:
  """Classes and split sizes; raises DataError (saying how to get it) if the data is missing."""
  return sources.get_dataset_info(data)


def create_train_iterator(data, *, global_batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this host's batches {'image': u8 [b, S, S, 3], 'label': i32 [b]}.

  Images stay uint8 pixels: the jitted steps normalise them on the device.

  Train: global shuffle per epoch (seeded), infinite repeat, per-example
  augmentation seeded by (seed, position in the stream) (so is a source's `draw(index, rng)`,
  where it has one: examples drawn anew every epoch), cut into global batches
  of which process p takes the contiguous block of rows [p * b, (p + 1) * b)
  (b = global batch / process count). Those rows are exactly where
  `sharding.shard_batch` puts process p's data in the global array, so every
  example sits at the same global index whatever the process count, and so does
  all per-example randomness keyed by that index (hashed dropout and drop-path,
  mixing partners): N processes, N devices of one process and one device train
  the same model. The iterator state (the next global batch) is the same on
  every process and valid for any process count. Each
  batch is assembled whole inside one thread or worker process, so the batches
  are the same whatever `data.num_workers` / `data.read_threads` are. The
  iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (or
  orbax with `grain.checkpoint.CheckpointSave` / `CheckpointRestore`) resume
  it at the same batch.
  """
  host_batch = _host_batch_size(global_batch_size, process_index, process_count,
                                "train.batch_size")
  transform = preprocess.TrainPreprocess.from_config(data)
  source = sources.get_source(data, data.train_split)
  if len(source) < global_batch_size:
    raise DataError(f"The training split {data.train_split!r} has {len(source)} examples, fewer "
                    f"than one global batch of {global_batch_size}.")
  if seed < 0:
    raise ConfigError(f"config.train.seed: must be >= 0, got {seed}.")
  shuffle_seed, augment_seed, draw_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(3))
  draw = getattr(source, "draw", None)  # a source whose examples are drawn anew each read
  if draw is None:
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  else:
    ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat()
    ds = ds.random_map(draw, seed=draw_seed)
  # Augmentation before the per-process slice: its randomness then follows the
  # global stream position, so no two hosts draw the same crops.
  ds = ds.random_map(transform, seed=augment_seed)
  # Blocks of `host_batch` consecutive examples; block g * P + p is process p's
  # part of global batch g (lazy: a process reads only its own blocks).
  ds = ds.batch(host_batch, drop_remainder=True)[process_index::process_count]
  return iter(_to_iter_dataset(ds, data, num_workers(data)))


def create_eval_iterator(data, *, global_batch_size: int, process_index: int = 0,
                         process_count: int = 1, corruption: str | None = None,
                         severity: int | None = None) -> Iterable[dict]:
  """A finite iterable of this host's batches of the eval split, with 'mask' (1 real, 0 pad).

  `corruption` / `severity` default to data.eval_corruption / data.eval_severity;
  pass '' for the clean set. With data.source='tiny_imagenet_c' a corruption
  reads the published Tiny-ImageNet-C files; otherwise it is generated.

  Eval: every example exactly once over all processes (process p takes
  examples p, p + P, ...), each host padded to the same number of full batches;
  padding has mask 0. Deterministic, corruptions included.
  """
  corruption = data.eval_corruption if corruption is None else corruption
  severity = data.eval_severity if severity is None else severity
  host_batch = _host_batch_size(global_batch_size, process_index, process_count,
                                "train.eval_batch_size")
  sources.check_source(data)
  if corruption and data.source == "tiny_imagenet_c":
    source = sources.get_published_corrupted_source(data, corruption, severity)
    corruption = ""  # Already in the files.
  else:
    if corruption:
      corruptions.check(corruption, severity)
    source = sources.get_source(data, data.eval_split)
  shard = PaddedShard(source, process_index, process_count, host_batch)
  ds = grain.MapDataset.source(shard).map(
      preprocess.EvalPreprocess(data.image_size, corruption, severity,
                                bool(data.get("corruption_jpeg", True))))
  # Clean evaluation is cheap (decode + resize only): starting worker processes
  # for every evaluation would cost more than it saves.
  workers = num_workers(data) if corruption else 0
  return _to_iter_dataset(ds.batch(host_batch), data, workers)


class PaddedShard:
  """Examples p, p + P, ... of `source`, padded to a whole number of batches.

  The count of batches is the same on every process (the largest shard's), so
  that all hosts run the same number of eval steps.
  """

  def __init__(self, source, process_index: int, process_count: int, host_batch: int):
    self._source = source
    self._process_index = process_index
    self._process_count = process_count
    largest_shard = -(-len(source) // process_count)
    self._len = -(-largest_shard // host_batch) * host_batch

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, k: int) -> dict:
    index = self._process_index + k * self._process_count
    if index < len(self._source):
      return {**self._source[index], "mask": 1.0, "index": index}
    return {"image": None, "label": 0, "mask": 0.0, "index": -1}


def _to_iter_dataset(ds: grain.MapDataset, data, workers: int) -> grain.IterDataset:
  threads = max(1, data.read_threads)
  # Elements are whole batches: a small buffer keeps memory at a few batches per process.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it_ds


def _ensure_absl_flags_parsed() -> None:
  """Lets grain's worker start-up read its absl flags outside an absl app (tests, scripts).

  grain reads --grain_enable_multiprocess_worker_profiling when starting
  workers; unparsed, absl raises. Under `absl.app.run` this does nothing.
  """
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _host_batch_size(global_batch_size: int, process_index: int, process_count: int,
                     field: str) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"config.{field}: the global batch {global_batch_size} must be a positive "
                      f"multiple of the {process_count} processes.")
  return global_batch_size // process_count
