"""predict on image files: top-5 names and probabilities, preprocessed as the evaluation is."""

import numpy as np
import pytest
from analysis_runs import run_dir, trained_runs
from PIL import Image

from diffvit_jax import models
from diffvit_jax.data import input_pipeline, normalise, sources
from diffvit_jax.evaluation import predict
from diffvit_jax.training import checkpointing


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
  return trained_runs(tmp_path_factory)


def parse(lines):
  rows = [line.split(maxsplit=1) for line in lines]
  return [(name, float(prob)) for prob, name in rows]


def test_top5_of_a_png(runs_root, tmp_path, capsys):
  workdir = run_dir(runs_root, "diffvit", 0)
  _, config, _ = checkpointing.load_for_inference(workdir)
  # The first validation image, as a file: predict must see what the evaluation sees.
  pixels = sources.get_source(config.data, config.data.eval_split)[0]["image"]
  path = str(tmp_path / "digit.png")
  Image.fromarray(pixels).save(path)

  assert predict.main(["--workdir", workdir, path]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5
  top = parse(lines)
  probs = [p for _, p in top]
  assert probs == sorted(probs, reverse=True)
  assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
  names = input_pipeline.get_dataset_info(config.data).class_names
  assert all(name in names for name, _ in top)

  # The same probabilities as the model on the evaluation pipeline's first image.
  params, _, _ = checkpointing.load_for_inference(workdir)
  batch = next(iter(input_pipeline.create_eval_iterator(config.data, global_batch_size=8,
                                                        corruption="", severity=0)))
  images = normalise.model_input(batch["image"][:1], config.data.mean, config.data.std)
  logits = models.build_model(config.model).apply({"params": params}, images, train=False)
  expected = np.asarray(np.exp(logits[0]) / np.exp(logits[0]).sum())
  for name, prob in top:
    assert prob == pytest.approx(expected[names.index(name)], abs=1e-4)


def test_several_images_get_a_header_each(runs_root, tmp_path, capsys):
  paths = []
  for i, size in enumerate((12, 40)):  # Any size: resized like the evaluation images.
    path = str(tmp_path / f"{i}.png")
    Image.fromarray(np.full((size, size), 40 * i, np.uint8)).save(path)  # grayscale too
    paths.append(path)
  assert predict.main(["--workdir", run_dir(runs_root, "vit", 0), "--top_k", "3", *paths]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line for line in lines if line.startswith("==")] == [f"== {p}" for p in paths]
  assert len(lines) == 2 * (1 + 3)


def test_unreadable_image_is_a_one_line_error(runs_root, tmp_path, capsys):
  bad = tmp_path / "not_an_image.png"
  bad.write_text("hello")
  assert predict.main(["--workdir", run_dir(runs_root, "vit", 0), str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "not_an_image.png" in err and "Traceback" not in err
