r"""Builds a TFDS data set of this project (once, before training).

  python -m diffvit_jax.data.prepare tiny_imagenet --data_dir DIR [--manual_dir DIR]

Downloads http://cs231n.stanford.edu/tiny-imagenet-200.zip unless the manual
dir (default DIR/downloads/manual) holds tiny-imagenet-200.zip or its
extracted folder, and writes array_record files under DIR/tiny_imagenet/.
Building uses TensorFlow (installed with tensorflow-datasets); reading them
back does not. Set `config.data.dir` to the same DIR for training.
"""

import sys

from absl import flags

from diffvit_jax import cli
from diffvit_jax.errors import ConfigError, UserError

DATASETS = ("tiny_imagenet",)
PROG = "python -m diffvit_jax.data.prepare"
FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", None, "TFDS data dir (config.data.dir).", flag_values=FLAGS)
flags.DEFINE_string("manual_dir", "", "Where tiny-imagenet-200.zip (or its extracted folder) "
                    "was put by hand.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Rebuild even if already built.", flag_values=FLAGS)
flags.mark_flag_as_required("data_dir", flag_values=FLAGS)


def build(name: str, data_dir: str, manual_dir: str = "", overwrite: bool = False) -> str:
  """Builds `name` into `data_dir`; returns the directory of the built version."""
  if name not in DATASETS:
    raise UserError(f"Unknown data set {name!r}; this command builds {DATASETS}.")
  # Imported here: building needs TFDS's writer machinery, reading does not.
  import tensorflow_datasets as tfds

  from diffvit_jax.data.tiny_imagenet import tiny_imagenet_dataset_builder

  builder = tiny_imagenet_dataset_builder.Builder(data_dir=data_dir, file_format="array_record")
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir or None,
      download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                     else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  builder.download_and_prepare(download_config=download_config)
  return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
  """The command line (argv without the program name); returns the exit code."""
  try:
    names = cli.parse(FLAGS, argv, prog=PROG, usage=__doc__)
    if names is None:
      return 0
    if len(names) != 1:
      raise ConfigError(f"{PROG} takes one data set name ({', '.join(DATASETS)}), got "
                        f"{len(names)}: {' '.join(names) or 'none'}.")
    path = build(names[0], FLAGS.data_dir, FLAGS.manual_dir, FLAGS.overwrite)
  except UserError as e:
    return cli.report(e)
  print(f"Built {names[0]} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
