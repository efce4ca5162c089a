"""The grain pipeline on an image folder whose images name themselves (flat colours)."""

import json

import data_fakes
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.data import input_pipeline, normalise
from diffvit_jax.errors import ConfigError

CLASSES = ("ant", "bee", "cat")
NUM_TRAIN = 30  # 10 per class
NUM_EVAL = 15  # 5 per class


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  data_fakes.write_image_folder(root, "train", CLASSES, per_class=10)
  data_fakes.write_image_folder(root, "validation", CLASSES, per_class=5, start_index=100)
  return str(root)


def _data(root, **overrides):
  fields = dict(source="image_folder", dir=root, image_size=8, crop="none",
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_workers=0)
  return config_lib.data_config(**{**fields, **overrides})


def _ids(batch) -> list[int]:
  return [data_fakes.colour_index(image[0, 0]) for image in batch["image"]]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_have_the_promised_layout(folder):
  batch = next(input_pipeline.create_train_iterator(_data(folder), global_batch_size=4, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  # Labels follow the sorted class folders: example i is in class i // 10.
  assert [i // 10 for i in _ids(batch)] == list(batch["label"])


def test_batches_are_pixels_and_normalisation_uses_mean_and_std(folder):
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  raw = next(input_pipeline.create_train_iterator(_data(folder), global_batch_size=2, seed=0))
  other = next(input_pipeline.create_train_iterator(
      _data(folder, mean=mean, std=std), global_batch_size=2, seed=0))
  np.testing.assert_array_equal(other["image"], raw["image"])  # mean / std act on the device
  normed = normalise.model_input(raw["image"], mean, std)
  assert normed.dtype == np.float32
  np.testing.assert_allclose(normed, (raw["image"] / 255.0 - mean) / np.array(std), atol=1e-5)
  np.testing.assert_allclose(normalise.pixels(normed, mean, std), raw["image"] / 255.0,
                             atol=1e-6)
  with pytest.raises(TypeError, match="uint8"):
    normalise.model_input(raw["image"].astype(np.int32), mean, std)


def test_num_workers_auto_shares_the_host_cores_among_the_sweeps_runs(monkeypatch):
  monkeypatch.setattr(input_pipeline, "host_cores", lambda: 16)
  monkeypatch.delenv(input_pipeline.CONCURRENT_RUNS_ENV, raising=False)
  auto = config_lib.data_config(num_workers="auto")
  assert input_pipeline.num_workers(auto) == 15  # one core left to the training process
  monkeypatch.setenv(input_pipeline.CONCURRENT_RUNS_ENV, "4")  # what the sweep sets
  assert input_pipeline.num_workers(auto) == 3
  monkeypatch.setattr(input_pipeline, "host_cores", lambda: 2)
  assert input_pipeline.num_workers(auto) == 0  # no core to spare: decode in-process
  assert input_pipeline.num_workers(config_lib.data_config(num_workers=5)) == 5  # a number wins
  for bad in ("many", -1, 2.5):
    with pytest.raises(ConfigError, match="num_workers"):
      input_pipeline.num_workers(config_lib.data_config(num_workers=bad))


def test_epochs_are_seeded_permutations(folder):
  it = input_pipeline.create_train_iterator(_data(folder), global_batch_size=5, seed=3)
  epoch1 = sum((_ids(b) for b in _take(it, 6)), [])
  epoch2 = sum((_ids(b) for b in _take(it, 6)), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(NUM_TRAIN))
  assert epoch1 != epoch2  # Reshuffled each epoch.
  again = input_pipeline.create_train_iterator(_data(folder), global_batch_size=5, seed=3)
  assert sum((_ids(b) for b in _take(again, 6)), []) == epoch1
  other = input_pipeline.create_train_iterator(_data(folder), global_batch_size=5, seed=4)
  assert sum((_ids(b) for b in _take(other, 6)), []) != epoch1


def test_augmentation_is_seeded(folder):
  data = _data(folder, image_size=16, crop="random_resized", flip=True,
               randaugment="rand-m9-mstd0.5-inc1",
               train_corruption="gaussian_noise", train_severity=3)
  a = _take(input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0), 2)
  b = _take(input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0), 2)
  c = _take(input_pipeline.create_train_iterator(data, global_batch_size=4, seed=1), 2)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert np.isfinite(a[0]["image"]).all()


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_take_contiguous_blocks_of_the_global_batches(folder, process_count):
  """Host p's batch is rows [p * b, (p + 1) * b) of the 1-process global batch, augmentation
  included, so every example keeps its global index (and the randomness keyed by it)."""
  data = _data(folder, crop="random_resized", flip=True)
  steps, global_batch = 7, 6
  host_batch = global_batch // process_count
  single = _take(input_pipeline.create_train_iterator(data, global_batch_size=global_batch,
                                                      seed=0), steps)
  hosts = [input_pipeline.create_train_iterator(
      data, global_batch_size=global_batch, seed=0, process_index=p,
      process_count=process_count) for p in range(process_count)]
  per_host = [_take(h, steps) for h in hosts]
  for step in range(steps):
    for p in range(process_count):
      rows = slice(p * host_batch, (p + 1) * host_batch)
      for key in ("image", "label"):
        np.testing.assert_array_equal(per_host[p][step][key], single[step][key][rows])
  ids = [sum((_ids(b) for b in h[:5]), []) for h in per_host]
  assert sorted(sum(ids, [])) == list(range(NUM_TRAIN))  # First epoch: each example once.
  # The state (the next global batch) is the same on every host and valid for any count.
  assert len({json.dumps(h.get_state(), sort_keys=True) for h in hosts}) == 1
  resumed = input_pipeline.create_train_iterator(data, global_batch_size=global_batch, seed=0)
  resumed.set_state(hosts[0].get_state())
  expected = _take(hosts[1], 1)[0]
  np.testing.assert_array_equal(next(resumed)["image"][host_batch:2 * host_batch],
                                expected["image"])


def test_state_restores_the_same_batches(folder):
  data = _data(folder, crop="random_resized", flip=True, randaugment="rand-n1-m9")
  it = input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0)
  _take(it, 9)  # Past the end of the first epoch.
  state = json.loads(json.dumps(it.get_state()))  # What grain's orbax handler writes.
  expected = _take(it, 4)
  resumed = input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 4), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_state_through_orbax_with_grain_checkpoint_args(folder, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  data = _data(folder)
  it = input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 2)
  resumed = input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert [_ids(b) for b in _take(resumed, 2)] == [_ids(b) for b in expected]


def test_worker_processes_give_the_same_batches(folder):
  in_process = _take(input_pipeline.create_train_iterator(
      _data(folder, crop="pad_crop"), global_batch_size=4, seed=0), 5)
  it = input_pipeline.create_train_iterator(
      _data(folder, crop="pad_crop", num_workers=2), global_batch_size=4, seed=0)
  try:
    batches = _take(it, 3)
    state = it.get_state()
    batches += _take(it, 2)
  finally:
    it.close()
  for x, y in zip(in_process, batches, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  resumed = input_pipeline.create_train_iterator(
      _data(folder, crop="pad_crop", num_workers=2), global_batch_size=4, seed=0)
  try:
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], in_process[3]["image"])
  finally:
    resumed.close()


@pytest.mark.parametrize("process_count,global_batch", [(1, 4), (2, 4), (3, 6), (4, 8)])
def test_eval_sees_every_example_once(folder, process_count, global_batch):
  data = _data(folder)
  seen, shapes, num_batches = [], set(), set()
  for p in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        data, global_batch_size=global_batch, process_index=p, process_count=process_count))
    num_batches.add(len(batches))
    for batch in batches:
      assert set(batch) == {"image", "label", "mask"}
      shapes.add(batch["image"].shape)
      real = batch["mask"] == 1
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
      assert not batch["image"][~real].any()  # Padding is blank.
      ids = [i for i, r in zip(_ids(batch), real, strict=True) if r]
      assert [(i - 100) // 5 for i in ids] == list(batch["label"][real])
      seen += ids
  assert sorted(seen) == list(range(100, 100 + NUM_EVAL))
  assert len(shapes) == 1 and len(num_batches) == 1  # Same shapes and step count everywhere.


def test_eval_is_deterministic_and_reiterable(folder):
  data = _data(folder, image_size=16)
  ds = input_pipeline.create_eval_iterator(data, global_batch_size=4,
                                           corruption="impulse_noise", severity=4)
  first, second = list(ds), list(ds)
  third = list(input_pipeline.create_eval_iterator(data, global_batch_size=4,
                                                   corruption="impulse_noise", severity=4))
  clean = list(input_pipeline.create_eval_iterator(data, global_batch_size=4, corruption=""))
  for a, b, c in zip(first, second, third, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["image"], c["image"])
  assert not np.array_equal(first[0]["image"], clean[0]["image"])


def test_eval_corruption_defaults_to_the_config(folder):
  data = _data(folder, eval_corruption="contrast", eval_severity=5)
  configured = next(iter(input_pipeline.create_eval_iterator(data, global_batch_size=4)))
  explicit = next(iter(input_pipeline.create_eval_iterator(
      data, global_batch_size=4, corruption="contrast", severity=5)))
  np.testing.assert_array_equal(configured["image"], explicit["image"])


def test_config_mistakes_name_the_field(folder):
  with pytest.raises(ConfigError, match="data.source"):
    input_pipeline.get_dataset_info(_data(folder, source="imagenet"))
  with pytest.raises(ConfigError, match="data.crop"):
    input_pipeline.create_train_iterator(_data(folder, crop="center"), global_batch_size=4,
                                         seed=0)
  with pytest.raises(ConfigError, match="data.train_corruption"):
    input_pipeline.create_train_iterator(_data(folder, train_corruption="rain", train_severity=1),
                                         global_batch_size=4, seed=0)
  with pytest.raises(ConfigError, match="batch"):
    input_pipeline.create_train_iterator(_data(folder), global_batch_size=5, seed=0,
                                         process_index=0, process_count=2)
  with pytest.raises(ConfigError, match="severity"):
    input_pipeline.create_eval_iterator(_data(folder), global_batch_size=4,
                                        corruption="pixelate", severity=0)


def test_corrupted_eval_in_worker_processes_matches_in_process(folder):
  kwargs = dict(global_batch_size=4, corruption="gaussian_noise", severity=2)
  in_process = list(input_pipeline.create_eval_iterator(_data(folder), **kwargs))
  in_workers = list(input_pipeline.create_eval_iterator(_data(folder, num_workers=2), **kwargs))
  assert len(in_process) == len(in_workers)
  for a, b in zip(in_process, in_workers, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
