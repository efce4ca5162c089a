r"""Builds a TFDS data set of this project (once, before training).

  python -m diffvit_jax.data.prepare tiny_imagenet --data_dir DIR [--manual_dir DIR]

Downloads http://cs231n.stanford.edu/tiny-imagenet-200.zip unless the manual
dir (default DIR/downloads/manual) holds tiny-imagenet-200.zip or its
extracted folder, and writes array_record files under DIR/tiny_imagenet/.
Building uses TensorFlow (installed with tensorflow-datasets); reading them
back does not. Set `config.data.dir` to the same DIR for training.
"""

import argparse
import sys

from diffvit_jax.errors import UserError

DATASETS = ("tiny_imagenet",)


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
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=DATASETS)
  parser.add_argument("--data_dir", required=True, help="TFDS data dir (config.data.dir).")
  parser.add_argument("--manual_dir", default="",
                      help="Where tiny-imagenet-200.zip (or its extracted folder) was put by hand.")
  parser.add_argument("--overwrite", action="store_true", help="Rebuild even if already built.")
  args = parser.parse_args(argv)
  try:
    path = build(args.name, args.data_dir, args.manual_dir, args.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  print(f"Built {args.name} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
