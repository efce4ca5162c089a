"""Small generated data sets with the layouts the data code reads.

Shared by the data tests (and the throughput benchmark): a fake Tiny ImageNet
archive (zipped or extracted), a fake Tiny-ImageNet-C tree and image folders
whose images encode their own index, so that tests can tell exactly which
examples a pipeline produced.
"""

import io
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image

# Deliberately not sorted: the builder must order classes by wnid itself.
FAKE_WNIDS = ("n03444034", "n01443537", "n09193705", "n02124075")
FAKE_WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n02124075": "Egyptian cat",
    "n03444034": "go-kart",
    "n09193705": "alp",
    "n00000001": "a synset that is not one of the classes",
}


def natural_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """A smooth image with edges: blurs, noise and JPEG visibly change it."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  channels = []
  for _ in range(3):
    fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
    channels.append(0.5 + 0.35 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
  image = np.stack(channels, -1)
  y0, x0 = rng.integers(0, size // 2, 2)
  image[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 1, 3)  # a sharp-edged patch
  return np.clip(image * 255, 0, 255).astype(np.uint8)


def _jpeg_bytes(image: np.ndarray, grayscale: bool) -> bytes:
  pil = Image.fromarray(image)
  if grayscale:
    pil = pil.convert("L")
  buf = io.BytesIO()
  pil.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def tiny_imagenet_files(num_train_per_class: int = 5, num_val: int = 8,
                        num_test: int = 2, seed: int = 0) -> dict[str, bytes]:
  """Relative path -> content of a tiny-imagenet-200 tree with 4 classes.

  Every third image is grayscale, as ~2% of the real ones are. Validation
  image i belongs to class FAKE_WNIDS[i % 4].
  """
  rng = np.random.default_rng(seed)
  root = "tiny-imagenet-200/"
  files = {
      root + "wnids.txt": "\n".join(FAKE_WNIDS).encode() + b"\n",
      root + "words.txt": "".join(f"{k}\t{v}\n" for k, v in FAKE_WORDS.items()).encode(),
  }
  count = 0
  for wnid in FAKE_WNIDS:
    boxes = []
    for i in range(num_train_per_class):
      name = f"{wnid}_{i}.JPEG"
      files[f"{root}train/{wnid}/images/{name}"] = _jpeg_bytes(
          natural_image(rng), grayscale=count % 3 == 0)
      boxes.append(f"{name}\t0\t0\t63\t63\n")
      count += 1
    files[f"{root}train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
  annotations = []
  for i in range(num_val):
    name = f"val_{i}.JPEG"
    files[f"{root}val/images/{name}"] = _jpeg_bytes(natural_image(rng), grayscale=i % 3 == 0)
    annotations.append(f"{name}\t{FAKE_WNIDS[i % 4]}\t0\t0\t63\t63\n")
  files[root + "val/val_annotations.txt"] = "".join(annotations).encode()
  for i in range(num_test):
    files[f"{root}test/images/test_{i}.JPEG"] = _jpeg_bytes(natural_image(rng), False)
  return files


def fake_val_label(file_name: str) -> int:
  """The label the builder must give a fake validation image (sorted-wnid index)."""
  index = int(file_name.split("_")[1].split(".")[0])
  return sorted(FAKE_WNIDS).index(FAKE_WNIDS[index % 4])


def write_tiny_imagenet(manual_dir: os.PathLike, zipped: bool, **kwargs) -> pathlib.Path:
  """Writes the fake archive into `manual_dir` as the zip or its extracted tree."""
  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  files = tiny_imagenet_files(**kwargs)
  if zipped:
    path = manual_dir / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w") as zf:
      for name, content in files.items():
        zf.writestr(name, content)
    return path
  for name, content in files.items():
    (manual_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (manual_dir / name).write_bytes(content)
  return manual_dir / "tiny-imagenet-200"


def write_tiny_imagenet_c(manual_dir: os.PathLike, corruption: str, severity: int,
                          per_class: int = 2, seed: int = 0,
                          wnids: tuple[str, ...] = FAKE_WNIDS) -> pathlib.Path:
  """`<manual_dir>/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG`, one folder per wnid."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(manual_dir) / "Tiny-ImageNet-C" / corruption / str(severity)
  for wnid in wnids:
    (root / wnid).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      (root / wnid / f"val_{i}.JPEG").write_bytes(_jpeg_bytes(natural_image(rng), False))
  return root


def index_colour(index: int) -> tuple[int, int, int]:
  """A colour that identifies example `index` (< 4096) after resizing."""
  return (index % 64) * 4, (index // 64) * 4, 200


def colour_index(pixel: np.ndarray) -> int:
  """Inverse of index_colour for an (approximately) decoded uint8 pixel."""
  r, g = (int(round(v / 4)) for v in pixel[:2])
  return r + 64 * g


def write_image_folder(root: os.PathLike, split: str, classes: tuple[str, ...],
                       per_class: int, start_index: int = 0, size: int = 16) -> list[int]:
  """`<root>/<split>/<class>/<i>.png`, flat-coloured by index_colour(i).

  Returns the indices written, in class order (class c holds a block of them).
  PNG keeps the colours exact, so a pipeline's output names its examples.
  """
  indices = []
  index = start_index
  for name in classes:
    folder = pathlib.Path(root) / split / name
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(per_class):
      image = np.zeros((size, size, 3), np.uint8) + np.array(index_colour(index), np.uint8)
      Image.fromarray(image).save(folder / f"{index:05d}.png")
      indices.append(index)
      index += 1
  return indices


def write_odd_images(folder: os.PathLike) -> list[str]:
  """Grayscale, RGBA, CMYK, palette and odd-sized images that must be converted."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  rgb = Image.fromarray(natural_image(rng, 40))
  images = {
      "gray.jpg": rgb.convert("L").resize((30, 50)),
      "rgba.png": rgb.convert("RGBA"),
      "cmyk.jpg": rgb.convert("CMYK"),
      "palette.png": rgb.convert("P"),
      "wide.jpg": rgb.resize((97, 13)),
  }
  for name, image in images.items():
    image.save(folder / name)
  return sorted(images)


def write_bad_images(folder: os.PathLike) -> list[str]:
  """A truncated JPEG, a file of garbage and an empty file."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  good = _jpeg_bytes(natural_image(np.random.default_rng(2)), False)
  (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
  (folder / "garbage.png").write_bytes(b"this is not an image" * 10)
  (folder / "empty.jpg").write_bytes(b"")
  return ["empty.jpg", "garbage.png", "truncated.jpg"]
