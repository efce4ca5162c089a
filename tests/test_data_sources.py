"""The digits and image_folder sources, odd image formats and corrupt files."""

import pathlib

import data_fakes
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.data import digits, image_folder, images, input_pipeline
from diffvit_jax.errors import ConfigError, DataError


def test_digits_split_is_fixed_and_stratified():
  data = config_lib.data_config(source="digits", image_size=16)
  info = input_pipeline.get_dataset_info(data)
  assert (info.num_classes, info.num_train, info.num_eval) == (10, 1437, 360)
  assert info.class_names == [str(d) for d in range(10)]
  val = digits.DigitsSource("validation", 16)
  counts = np.bincount([val[i]["label"] for i in range(len(val))], minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class's ~180.
  example = val[0]
  assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
  assert (example["image"][..., 0] == example["image"][..., 2]).all()  # Gray as RGB.
  assert example["image"].max() > 200  # 0..16 stretched to 0..255.


def test_digits_are_upsampled_once_and_pickled_without_them():
  import pickle

  from PIL import Image

  source = digits.DigitsSource("train", 12)
  gray = digits.split_arrays()["train"][0][5]
  expected = np.asarray(Image.fromarray(gray).resize((12, 12), Image.BILINEAR).convert("RGB"))
  np.testing.assert_array_equal(source[5]["image"], expected)
  assert not source[5]["image"].flags.writeable  # a shared view: no transform may write to it
  copy = pickle.loads(pickle.dumps(source))  # as grain sends it to a worker process
  assert copy._images is None
  np.testing.assert_array_equal(copy[5]["image"], expected)


def test_digits_pipeline_runs_with_the_quickstart_settings():
  data = config_lib.data_config(source="digits", image_size=16, crop="pad_crop",
                                mean=(0.5,) * 3, std=(0.5,) * 3)
  batch = next(input_pipeline.create_train_iterator(data, global_batch_size=32, seed=0))
  assert batch["image"].shape == (32, 16, 16, 3)
  assert batch["image"].dtype == np.uint8  # Pixels: the steps normalise on the device.
  assert batch["image"].max() > 200  # 0..16 stretched to 0..255.
  total = sum(int(b["mask"].sum()) for b in input_pipeline.create_eval_iterator(
      data, global_batch_size=64))
  assert total == 360


def test_odd_images_are_converted(tmp_path):
  names = data_fakes.write_odd_images(tmp_path / "train" / "odd")
  source = image_folder.load(tmp_path, "train")
  assert len(source) == len(names)
  for i in range(len(source)):
    image = source[i]["image"]
    assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
  data = config_lib.data_config(source="image_folder", dir=str(tmp_path), eval_split="train",
                                image_size=24)
  batch = next(iter(input_pipeline.create_eval_iterator(data, global_batch_size=8)))
  assert batch["image"].shape == (8, 24, 24, 3)


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
  from PIL import Image

  ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
  Image.fromarray(ramp).save(tmp_path / "deep.png")
  image = images.read(tmp_path / "deep.png")
  assert image.shape == (64, 64, 3) and image.max() > 200 and image.min() == 0


def _folder_with_bad_files(root: pathlib.Path) -> list[str]:
  data_fakes.write_image_folder(root, "train", ("a", "b"), per_class=3)
  data_fakes.write_image_folder(root, "validation", ("a", "b"), per_class=2, start_index=50)
  return data_fakes.write_bad_images(root / "train" / "b")


def test_bad_images_are_skipped_counted_and_named(tmp_path):
  bad = _folder_with_bad_files(tmp_path)
  data = config_lib.data_config(source="image_folder", dir=str(tmp_path), image_size=8)
  with pytest.warns(UserWarning) as record:
    info = input_pipeline.get_dataset_info(data)
  message = " ".join(str(w.message) for w in record)
  assert f"Skipping {len(bad)} of 9 images" in message
  assert all(name in message for name in bad)
  assert info.num_train == 6
  batches = [next(input_pipeline.create_train_iterator(data, global_batch_size=6, seed=0))
             for _ in range(2)]
  assert all(b["image"].shape == (6, 8, 8, 3) for b in batches)


def test_bad_images_are_an_error_when_asked(tmp_path):
  bad = _folder_with_bad_files(tmp_path)
  data = config_lib.data_config(source="image_folder", dir=str(tmp_path), image_size=8,
                                on_bad_image="error")
  with pytest.raises(DataError) as e:
    input_pipeline.get_dataset_info(data)
  assert all(name in str(e.value) for name in bad)
  assert "on_bad_image='skip'" in str(e.value)


def test_image_folder_layout_mistakes(tmp_path):
  with pytest.raises(ConfigError, match="data.dir"):
    input_pipeline.get_dataset_info(config_lib.data_config(source="image_folder", dir=""))
  with pytest.raises(DataError, match="neither split folder exists"):
    input_pipeline.get_dataset_info(
        config_lib.data_config(source="image_folder", dir=str(tmp_path)))
  data_fakes.write_image_folder(tmp_path, "train", ("a", "b"), per_class=2)
  data_fakes.write_image_folder(tmp_path, "validation", ("a", "zebra"), per_class=1)
  with pytest.raises(DataError, match="zebra"):
    input_pipeline.get_dataset_info(
        config_lib.data_config(source="image_folder", dir=str(tmp_path)))


def test_image_folder_labels_follow_training_classes(tmp_path):
  data_fakes.write_image_folder(tmp_path, "train", ("a", "b", "c"), per_class=2)
  data_fakes.write_image_folder(tmp_path, "validation", ("c",), per_class=2, start_index=10)
  data = config_lib.data_config(source="image_folder", dir=str(tmp_path), image_size=4)
  batch = next(iter(input_pipeline.create_eval_iterator(data, global_batch_size=2)))
  assert list(batch["label"]) == [2, 2]
