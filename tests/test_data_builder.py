"""The Tiny ImageNet TFDS builder on a generated archive, and reading its array_record output."""

import os
import pathlib
import subprocess
import sys
import textwrap

import data_fakes
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.data import input_pipeline, sources
from diffvit_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _build(tmp_path_factory, zipped: bool) -> str:
  from diffvit_jax.data import prepare

  root = tmp_path_factory.mktemp("zip" if zipped else "extracted")
  data_fakes.write_tiny_imagenet(root / "manual", zipped=zipped)
  prepare.build("tiny_imagenet", str(root / "data"), str(root / "manual"))
  return str(root / "data")


@pytest.fixture(scope="module")
def zip_build(tmp_path_factory):
  return _build(tmp_path_factory, zipped=True)


@pytest.fixture(scope="module")
def extracted_build(tmp_path_factory):
  return _build(tmp_path_factory, zipped=False)


def _data(data_dir, **overrides):
  fields = dict(source="tiny_imagenet", dir=data_dir, image_size=64, mean=(0, 0, 0),
                std=(1, 1, 1))
  return config_lib.data_config(**{**fields, **overrides})


def _records(data_dir, split):
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(sources.tiny_imagenet_builder_dir(_data(data_dir)))
  return list(builder.as_data_source(split)), builder.info


@pytest.mark.parametrize("which", ["zip_build", "extracted_build"])
def test_split_sizes_labels_and_names(which, request):
  data_dir = request.getfixturevalue(which)
  info = input_pipeline.get_dataset_info(_data(data_dir))
  assert (info.num_classes, info.num_train, info.num_eval) == (4, 20, 8)
  # Sorted-wnid order, names from words.txt.
  assert info.class_names == [data_fakes.FAKE_WORDS[w] for w in sorted(data_fakes.FAKE_WNIDS)]
  val, tfds_info = _records(data_dir, "validation")
  assert tfds_info.file_format.value == "array_record"
  for record in val:
    file_name = record["file_name"].decode()
    assert record["label"] == data_fakes.fake_val_label(file_name), file_name
  train, _ = _records(data_dir, "train")
  for record in train:
    wnid = record["file_name"].decode().split("_")[0]
    assert record["label"] == sorted(data_fakes.FAKE_WNIDS).index(wnid)


def test_grayscale_images_become_rgb(zip_build):
  train, _ = _records(zip_build, "train")
  gray_names = {f"{w}_{i}.JPEG" for c, (w, i) in enumerate(
      (w, i) for w in data_fakes.FAKE_WNIDS for i in range(5)) if c % 3 == 0}
  for record in train:
    image = record["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    spread = np.abs(image.astype(int) - image.mean(-1, keepdims=True)).max()
    if record["file_name"].decode() in gray_names:
      assert spread <= 2  # Three equal channels up to JPEG rounding.
    else:
      assert spread > 10


def test_zip_and_extracted_builds_agree(zip_build, extracted_build):
  for split in ("train", "validation"):
    a = {r["file_name"]: r for r in _records(zip_build, split)[0]}
    b = {r["file_name"]: r for r in _records(extracted_build, split)[0]}
    assert a.keys() == b.keys()
    for name in a:
      assert a[name]["label"] == b[name]["label"]
      np.testing.assert_array_equal(a[name]["image"], b[name]["image"])


def test_reading_does_not_import_tensorflow(zip_build):
  script = textwrap.dedent(f"""
      import sys
      from diffvit_jax import config_lib
      from diffvit_jax.data import input_pipeline
      data = config_lib.data_config(source="tiny_imagenet", dir={zip_build!r}, image_size=32,
                                    crop="random_resized", flip=True,
                                    randaugment="rand-m9-mstd0.5-inc1")
      assert input_pipeline.get_dataset_info(data).num_train == 20
      batch = next(input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0))
      assert batch["image"].shape == (4, 32, 32, 3)
      n = sum(int(b["mask"].sum()) for b in input_pipeline.create_eval_iterator(
          data, global_batch_size=3, corruption="shot_noise", severity=2))
      assert n == 8, n
      assert "tensorflow" not in sys.modules, "reading imported TensorFlow"
      print("ok")
      """)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_eval_pipeline_over_the_build(zip_build):
  data = _data(zip_build)
  labels = []
  for batch in input_pipeline.create_eval_iterator(data, global_batch_size=5):
    assert batch["image"].shape == (5, 64, 64, 3)
    labels += list(batch["label"][batch["mask"] == 1])
  assert len(labels) == 8
  assert sorted(labels) == sorted(data_fakes.fake_val_label(f"val_{i}.JPEG") for i in range(8))


def test_missing_build_says_how_to_get_it(tmp_path):
  data = _data(str(tmp_path / "nothing"), manual_dir="/somewhere/manual")
  with pytest.raises(DataError) as e:
    input_pipeline.get_dataset_info(data)
  message = str(e.value)
  assert "python -m diffvit_jax.data.prepare tiny_imagenet --data_dir" in message
  assert "--manual_dir /somewhere/manual" in message
  assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
  with pytest.raises(DataError):
    input_pipeline.create_train_iterator(data, global_batch_size=4, seed=0)


def test_published_tiny_imagenet_c(zip_build, tmp_path):
  data_fakes.write_tiny_imagenet_c(tmp_path, "fog", 3, per_class=2)
  data = _data(zip_build, source="tiny_imagenet_c", manual_dir=str(tmp_path))
  labels = []
  for batch in input_pipeline.create_eval_iterator(data, global_batch_size=3, corruption="fog",
                                                   severity=3):
    labels += list(batch["label"][batch["mask"] == 1])
  assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]  # Each sorted wnid folder is its label.
  with pytest.raises(DataError, match="Tiny-ImageNet-C"):
    input_pipeline.create_eval_iterator(data, global_batch_size=3, corruption="fog", severity=5)
  # Without a corruption, tiny_imagenet_c evaluates on the clean build.
  clean = input_pipeline.create_eval_iterator(data, global_batch_size=8, corruption="")
  assert int(next(iter(clean))["mask"].sum()) == 8


def test_published_folders_must_hold_the_tiny_imagenet_wnids(zip_build, tmp_path):
  assert sources.tiny_imagenet_wnids(_data(zip_build)) == sorted(data_fakes.FAKE_WNIDS)
  # As many class folders as Tiny ImageNet has classes, but one is not a Tiny ImageNet class.
  wrong = (*data_fakes.FAKE_WNIDS[:3], "n99999999")
  data_fakes.write_tiny_imagenet_c(tmp_path, "snow", 2, per_class=1, wnids=wrong)
  data = _data(zip_build, source="tiny_imagenet_c", manual_dir=str(tmp_path))
  with pytest.raises(DataError, match=rf"1 missing \({data_fakes.FAKE_WNIDS[3]}\), 1 not "
                                      r"Tiny ImageNet classes \(n99999999\)"):
    input_pipeline.create_eval_iterator(data, global_batch_size=3, corruption="snow", severity=2)


def test_build_cli_reports_user_errors(tmp_path, capsys):
  from diffvit_jax.data import prepare

  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "tiny-imagenet-200.zip").write_bytes(b"not a zip")
  code = prepare.main(["tiny_imagenet", "--data_dir", str(tmp_path / "d"),
                     "--manual_dir", str(tmp_path / "manual")])
  assert code != 0
  assert "error:" in capsys.readouterr().err


def test_wnids_of_a_build_that_did_not_record_them(zip_build, tmp_path):
  import shutil

  old_build = tmp_path / "data"
  shutil.copytree(zip_build, old_build)
  for metadata in old_build.glob("tiny_imagenet/*/metadata.json"):
    metadata.unlink()
  with pytest.raises(DataError, match="predates"):
    sources.tiny_imagenet_wnids(_data(str(old_build), manual_dir=str(tmp_path / "none")))
  data_fakes.write_tiny_imagenet(tmp_path / "manual", zipped=True)
  wnids = sources.tiny_imagenet_wnids(_data(str(old_build), manual_dir=str(tmp_path / "manual")))
  assert wnids == sorted(data_fakes.FAKE_WNIDS)
