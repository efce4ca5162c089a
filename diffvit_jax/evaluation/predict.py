r"""Top-5 classes of image files under a trained checkpoint.

  python -m diffvit_jax.evaluation.predict --workdir RUN [--best] [--top_k 5] IMAGE...

Each image is decoded, resized and normalised exactly as the evaluation
pipeline does it (`data.images`, `data.preprocess`), then classified. Prints,
per image, one line per class: probability, then the class name (Tiny
ImageNet: the words.txt name of its wnid), most probable first; with several
images each block starts with '== IMAGE'.
"""

import sys

import numpy as np
from absl import flags

from diffvit_jax import cli
from diffvit_jax.errors import ConfigError, DataError, UserError

PROG = "python -m diffvit_jax.evaluation.predict"
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's directory (config and checkpoints are "
                    "read from it).", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 5, "Classes per image.", flag_values=FLAGS)
flags.DEFINE_bool("best", False, "Use the best checkpoint, not the latest.", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def load_image(path: str, data_config) -> np.ndarray:
  """One image file -> the model's float32 [S, S, 3] input, as evaluation makes it."""
  from diffvit_jax.data import images, normalise, preprocess

  try:
    pixels = images.read(path)
  except (OSError, ValueError) as e:
    raise DataError(f"Cannot read {path} as an image ({type(e).__name__}: {e}).") from e
  resized = preprocess.EvalPreprocess(data_config.image_size).map(
      {"image": pixels, "label": 0, "mask": 1.0})
  return normalise.model_input(resized["image"], data_config.mean, data_config.std)


def class_names(data_config, num_classes: int) -> list[str]:
  """The data set's class names; indices (with a warning) when the data set is not here."""
  from diffvit_jax.data import input_pipeline

  try:
    names = list(input_pipeline.get_dataset_info(data_config).class_names)
  except DataError as e:
    print(f"warning: no class names ({str(e).splitlines()[0]}); printing class indices.",
          file=sys.stderr)
    return [f"class {i}" for i in range(num_classes)]
  if len(names) != num_classes:
    raise DataError(f"The data set has {len(names)} classes but the model predicts "
                    f"{num_classes}: the checkpoint's config.data does not describe this data.")
  return names


def predict(workdir: str, paths: list[str], *, top_k: int = 5,
            best: bool = False) -> list[list[tuple[str, float]]]:
  """Per image, the top_k (class name, probability), most probable first."""
  import jax

  from diffvit_jax import models
  from diffvit_jax.training import checkpointing

  params, config, _ = checkpointing.load_for_inference(workdir, best=best)
  batch = np.stack([load_image(p, config.data) for p in paths])
  logits = models.build_model(config.model).apply({"params": params}, batch, train=False)
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1), np.float64)
  names = class_names(config.data, probs.shape[-1])
  k = min(top_k, probs.shape[-1])
  results = []
  for row in probs:
    top = np.argsort(-row, kind="stable")[:k]
    results.append([(names[i], float(row[i])) for i in top])
  return results


def main(argv: list[str] | None = None) -> int:
  """The command line (argv without the program name); returns the exit code."""
  try:
    images = cli.parse(FLAGS, argv, prog=PROG, usage=__doc__)
    if images is None:
      return 0
    if not images:
      raise ConfigError(f"{PROG}: give at least one IMAGE file to classify.")
    if FLAGS.top_k < 1:
      raise ConfigError(f"--top_k must be at least 1, got {FLAGS.top_k}.")
    results = predict(FLAGS.workdir, images, top_k=FLAGS.top_k, best=FLAGS.best)
  except UserError as e:
    return cli.report(e)
  for path, top in zip(images, results, strict=True):
    if len(images) > 1:
      print(f"== {path}")
    for name, prob in top:
      print(f"{prob:.4f}  {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
