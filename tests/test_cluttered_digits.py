"""The cluttered digits source (data/cluttered_digits.py) and configs/clutter.py's design."""

import os
import sys

import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.data import cluttered_digits, digits, input_pipeline, sources
from diffvit_jax.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import clutter  # noqa: E402


def _data(fragments=8, **overrides):
  config = clutter.get_config(f"vit_{fragments}")
  config.data.update(overrides)
  return config.data


def _target_box(kinds):
  ys, xs = np.nonzero(kinds == 2)
  return ys.min(), ys.max(), xs.min(), xs.max()


def test_examples_place_the_digit_off_the_clutter_and_label_it():
  source = sources.get_source(_data(16), "validation")
  ups = cluttered_digits._upscaled("validation", 3)
  labels = digits.split_arrays()["validation"][1]
  assert len(source) == len(labels)
  for i in range(0, len(source), 37):
    example = source[i]
    canvas, kinds = source.compose(i, source._fixed_rng(i))
    assert example["image"].shape == (48, 48, 3) and example["image"].dtype == np.uint8
    assert np.array_equal(example["image"][..., 0], canvas) and example["label"] == labels[i]
    y0, y1, x0, x1 = _target_box(kinds)
    # No clutter ink inside the digit's ink box (fragments miss the digit's whole box), and
    # the digit's pixels are the upscaled digit's, untouched.
    assert not (kinds[y0:y1 + 1, x0:x1 + 1] == 1).any()
    assert (kinds == 1).any()
    assert np.isin(canvas[kinds == 2], ups[i][ups[i] >= cluttered_digits.INK]).all()
    # A patch is target where it holds target ink, else clutter where it holds clutter ink.
    patches = source.patch_kinds(i, 8)
    expected = kinds.reshape(6, 8, 6, 8).max(axis=(1, 3))
    assert np.array_equal(patches, expected) and patches.shape == (6, 6)


def test_no_clutter_is_the_digit_alone_and_levels_nest():
  plain = sources.get_source(_data(0), "validation")
  ups = cluttered_digits._upscaled("validation", 3)
  canvas, kinds = plain.compose(5, plain._fixed_rng(5))
  assert not (kinds == 1).any() and canvas.sum() == ups[5].astype(int).sum()
  # The validation placements are fixed: the same at every level, in every process.
  busy = sources.get_source(_data(8), "validation")
  assert np.array_equal(_target_box(busy.compose(5, busy._fixed_rng(5))[1]), _target_box(kinds))
  again = sources.get_source(_data(8), "validation")
  assert np.array_equal(busy[7]["image"], again[7]["image"])
  fractions = []
  for level in (0, 4, 16):
    s = sources.get_source(_data(level), "validation")
    fractions.append(np.mean([(s.patch_kinds(i, 8) == 1).mean() for i in range(60)]))
  assert fractions[0] == 0 < fractions[1] < fractions[2]


def test_training_draws_new_placements_every_epoch():
  data = _data(4)
  # One batch per epoch: the whole split, so each epoch holds every digit once.
  n = len(sources.get_source(data, "train"))
  it = input_pipeline.create_train_iterator(data, global_batch_size=n, seed=0)
  first, second = next(it), next(it)

  def signature(batch):  # (ink of the image, its centre of mass), sorted
    images = batch["image"][..., 0].astype(np.float64)
    grid = np.arange(48)
    mass = images.sum(axis=(1, 2))
    cy = (images.sum(axis=2) * grid).sum(1) / mass
    return sorted(zip(np.round(cy, 3), mass, strict=True))

  assert signature(first) != signature(second)
  # Deterministic: the same seed gives the same batches.
  again = next(input_pipeline.create_train_iterator(data, global_batch_size=n, seed=0))
  assert np.array_equal(again["image"], first["image"])
  source = sources.get_source(data, "train")
  a = source.draw(3, np.random.default_rng(1))["image"]
  b = source.draw(3, np.random.default_rng(2))["image"]
  assert not np.array_equal(a, b)


@pytest.mark.parametrize("field,value,needle", [
    ("image_size", 24, "at least the digit"),
    ("clutter.fragments", -1, "clutter.fragments"),
    ("clutter.fragment_size", 30, "larger than the upscaled digit"),
    ("clutter.digit_scale", 0, "clutter.digit_scale"),
])
def test_bad_clutter_settings_are_config_errors(field, value, needle):
  config = clutter.get_config("vit_4")
  config.model.patch_size = 4
  if field == "image_size":
    config.data.image_size = value
  else:
    config.data.clutter[field.split(".")[1]] = value
  with pytest.raises(ConfigError, match=needle):
    config_lib.validate(config)


def test_the_study_compares_matched_pairs_at_every_level():
  from diffvit_jax.reporting import manifest

  configs = [clutter.get_config(f"{arch}_{level}") for level in clutter.LEVELS
             for arch in ("vit", "diffvit")]
  for config in configs:
    config_lib.validate(config)
  design = manifest.from_configs([(c.analysis.level, c) for c in configs], [0, 1, 2])
  assert [p.size for p in design.family] == [f"{n} fragments" for n in clutter.LEVELS]
  assert {p.protocol for p in design.family} == {"clutter"}
  with pytest.raises(ValueError, match="Bad config argument"):
    clutter.get_config("vit_many")
