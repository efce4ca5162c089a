"""Tiny ImageNet (CS231n, Stanford): 200 classes, 64x64 RGB, 100k train / 10k val.

Not in the TFDS catalog, so the project carries its own builder. It takes the
official `tiny-imagenet-200.zip` from TFDS's manual dir (zipped or already
extracted) or downloads it, and writes array_record shards so that training
reads the data without TensorFlow. Build it with

  python -m diffvit_jax.data.prepare tiny_imagenet --data_dir DIR [--manual_dir DIR]

Labels index the class wnids in sorted order: the convention of torchvision's
ImageFolder over `train/`, which Tiny-ImageNet-C evaluation code also follows,
so labels agree with the published corrupted sets. The test split (no labels)
is not built.
"""

import hashlib
import io
import os

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from diffvit_jax.errors import DataError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_NAME = "tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ZIP_SIZE = 248_100_043
IMAGE_SIZE = 64
# Grayscale images are re-encoded once, as RGB; 95 keeps that extra JPEG
# generation below the originals' own compression noise.
_REENCODE_QUALITY = 95

_CITATION = """\
@misc{le2015tiny,
  title = {Tiny ImageNet Visual Recognition Challenge},
  author = {Le, Ya and Yang, Xuan},
  year = {2015},
  howpublished = {CS231N course, Stanford},
}"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet 200, train and validation splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Train and validation splits; grayscale images stored as RGB."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Without internet access, download {URL} elsewhere and put `{ZIP_NAME}` (or the
  `tiny-imagenet-200/` folder extracted from it) into the manual dir.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports the `importlib_resources` backport, absent on
    # Python >= 3.9; this file is where the builder (and checksums.tsv) lives.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
            # Names come from the archive's words.txt, set in _split_generators.
            "label": tfds.features.ClassLabel(),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        # The class wnids (wnids.txt, sorted), against which the published
        # Tiny-ImageNet-C folders are checked; saved as metadata.json in the build.
        metadata=tfds.core.MetadataDict(),
        homepage="http://cs231n.stanford.edu/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = _find_extracted_archive(dl_manager)
    wnids = sorted(_read_lines(root / "wnids.txt"))
    self.info.features["label"].names = class_names(wnids, _read_words(root / "words.txt"))
    self.info.metadata["wnids"] = wnids
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    return {
        "train": self._generate_examples(_train_files(root / "train", label_of)),
        "validation": self._generate_examples(_validation_files(root / "val", label_of)),
    }

  def _generate_examples(self, files: list[tuple[epath.Path, int]]):
    for path, label in files:
      yield path.name, {"image": _rgb_jpeg(path), "label": label, "file_name": path.name}


def _train_files(train_dir: epath.Path, label_of: dict[str, int]) -> list[tuple[epath.Path, int]]:
  files = []
  for wnid, label in label_of.items():
    images_dir = train_dir / wnid / "images"
    if not images_dir.exists():
      raise DataError(f"The Tiny ImageNet archive has no folder {images_dir} for class {wnid} "
                      "listed in wnids.txt: the archive is incomplete; download it again.")
    files += [(path, label) for path in sorted(images_dir.iterdir())
              if path.suffix.lower() in (".jpeg", ".jpg")]
  return files


def _validation_files(val_dir: epath.Path,
                      label_of: dict[str, int]) -> list[tuple[epath.Path, int]]:
  files = []
  for line in _read_lines(val_dir / "val_annotations.txt"):
    file_name, wnid = line.split("\t")[:2]
    if wnid not in label_of:
      raise DataError(f"val_annotations.txt labels {file_name} with {wnid}, which is not in "
                      "wnids.txt: the archive is inconsistent; download it again.")
    files.append((val_dir / "images" / file_name, label_of[wnid]))
  return files


def class_names(wnids: list[str], words: dict[str, str]) -> list[str]:
  """words.txt descriptions, made unique (ClassLabel needs that) with the wnid."""
  names = [words.get(wnid, wnid) for wnid in wnids]
  return [f"{name} ({wnid})" if names.count(name) > 1 else name
          for name, wnid in zip(names, wnids, strict=True)]


def _rgb_jpeg(path: epath.Path) -> bytes:
  """The original bytes when already 64x64 RGB, else a converted re-encoding."""
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return data
      image = image.convert("RGB")
      if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=_REENCODE_QUALITY)
      return buffer.getvalue()
  except OSError as e:
    raise DataError(f"Cannot decode {path} ({e}): the Tiny ImageNet archive is damaged; "
                    f"download {URL} again.") from e


def _find_extracted_archive(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The `tiny-imagenet-200` folder: from the manual dir if there, else downloaded."""
  manual_dir = _manual_dir(dl_manager)
  if manual_dir is not None:
    for candidate in (manual_dir / "tiny-imagenet-200", manual_dir):
      if (candidate / "wnids.txt").exists():
        return candidate
    if (manual_dir / ZIP_NAME).exists():
      return _extract(dl_manager, manual_dir / ZIP_NAME)
  try:
    path = dl_manager.download(URL)
  except Exception as e:  # Any download failure gets the same advice.
    raise DataError(
        f"Could not download {URL} ({type(e).__name__}: {e}). Download it by other means and "
        f"put {ZIP_NAME} (zipped or extracted) into the manual dir, then build again with "
        "`python -m diffvit_jax.data.prepare tiny_imagenet --data_dir DIR --manual_dir MANUAL_DIR`."
    ) from e
  _check_md5(epath.Path(path))
  return _extract(dl_manager, path)


def _extract(dl_manager: tfds.download.DownloadManager, zip_path: os.PathLike) -> epath.Path:
  try:
    extracted = dl_manager.extract(zip_path)
  except Exception as e:  # zipfile, TFDS and the file system each raise their own types.
    raise DataError(f"Cannot extract {zip_path} ({type(e).__name__}: {e}): it is not a complete "
                    f"zip archive; download {URL} again.") from e
  return _extracted_root(extracted)


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
  try:
    return dl_manager.manual_dir
  except AssertionError:  # TFDS's way of saying that it is missing or empty
    return None


def _extracted_root(extracted: os.PathLike) -> epath.Path:
  extracted = epath.Path(extracted)
  for candidate in (extracted / "tiny-imagenet-200", extracted):
    if (candidate / "wnids.txt").exists():
      return candidate
  raise DataError(f"{extracted} (extracted from {ZIP_NAME}) has no tiny-imagenet-200/wnids.txt: "
                  f"this is not the Tiny ImageNet archive; download {URL} again.")


def _check_md5(path: epath.Path) -> None:
  digest = hashlib.md5()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  if digest.hexdigest() != ZIP_MD5:
    raise DataError(f"The downloaded {path} has md5 {digest.hexdigest()}, not the official "
                    f"{ZIP_MD5} ({ZIP_SIZE} bytes): the download is damaged; delete it and "
                    "build again.")


def _read_lines(path: epath.Path) -> list[str]:
  if not path.exists():
    raise DataError(f"{path} is missing: the Tiny ImageNet archive is incomplete; "
                    f"download {URL} again.")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_words(path: epath.Path) -> dict[str, str]:
  words = {}
  for line in _read_lines(path):
    wnid, _, description = line.partition("\t")
    words[wnid] = description.strip()
  return words
