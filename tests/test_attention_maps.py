"""The attention-map figures on a short run's checkpoint, and the query pooling they show."""

import os

import numpy as np
import pytest
from analysis_runs import run_dir, trained_runs
from PIL import Image

from diffvit_jax.evaluation import attention_maps
from diffvit_jax.training import checkpointing


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
  return trained_runs(tmp_path_factory)


def check_png(path, min_width, min_height):
  with Image.open(path) as image:
    assert image.size[0] >= min_width and image.size[1] >= min_height, image.size
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 20


@pytest.mark.parametrize("arch", ["vit", "diffvit"])
def test_cli_writes_a_figure_per_image_and_a_summary(runs_root, tmp_path, capsys, arch):
  out = str(tmp_path / "maps")
  code = attention_maps.main(["--workdir", run_dir(runs_root, arch, 0), "--num_images", "2",
                              "--out", out])
  assert code == 0
  printed = capsys.readouterr().out.split()
  expected = ["attention_0", "attention_1", "attention_summary"]
  assert [os.path.basename(p)[:-4] for p in printed] == expected
  for stem in expected:
    assert os.path.exists(os.path.join(out, stem + ".svg"))
  # 2 layers; per head 1 map (vit, 4 heads) or 3 maps (diffvit, 2 pairs), about 1.2 in. each.
  check_png(os.path.join(out, "attention_0.png"), min_width=500, min_height=250)
  check_png(os.path.join(out, "attention_summary.png"), min_width=250, min_height=250)


def test_class_token_and_mean_query_pooling():
  batch, heads, grid = 2, 3, 4
  rng = np.random.default_rng(0)
  attn = rng.random((batch, heads, grid * grid + 1, grid * grid + 1))
  cls = attention_maps.pool_queries(attn, "cls", grid)
  assert cls.shape == (batch, heads, grid, grid)
  np.testing.assert_array_equal(cls[1, 2].ravel(), attn[1, 2, 0, 1:])  # class token's row
  patches = attn[:, :, 1:, 1:]
  gap = attention_maps.pool_queries(patches, "gap", grid)
  np.testing.assert_allclose(gap[0, 1].ravel(), patches[0, 1].mean(axis=0))

  assert attention_maps.pool_lambda(0.3, "gap", batch, heads).shape == (batch, heads)
  per_token = rng.random((batch, heads, grid * grid + 1))  # diffvit2: one lambda per query
  np.testing.assert_array_equal(attention_maps.pool_lambda(per_token, "cls", batch, heads),
                                per_token[:, :, 0])


def test_pooled_difference_is_the_difference_of_the_pooled_maps(runs_root):
  params, config, _ = checkpointing.load_for_inference(run_dir(runs_root, "diffvit", 0))
  images, _ = attention_maps.load_images(config, 2)
  grid = config.data.image_size // config.model.patch_size
  layers = attention_maps.pooled_maps(config.model, params, images, grid)
  assert len(layers) == config.model.depth
  for layer in layers:
    lam = layer["lambda"][:, :, None, None]
    np.testing.assert_allclose(layer["diff"], layer["attn1"] - lam * layer["attn2"], atol=1e-6)
    # Softmax rows sum to 1, so a pooled map over the patches does too (gap: all queries).
    np.testing.assert_allclose(layer["attn1"].sum(axis=(-1, -2)), 1.0, atol=1e-5)


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
  assert attention_maps.main(["--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "Traceback" not in err
