"""Decoding any image file into the one layout the pipeline uses: uint8 [h, w, 3] RGB."""

import io
import os

import numpy as np
from PIL import Image

# What image folders are scanned for (lower case); other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def decode(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes; raises OSError (or ValueError) when they are not an image."""
  with Image.open(io.BytesIO(data)) as image:
    return to_rgb(image)


def read(path: os.PathLike) -> np.ndarray:
  with open(path, "rb") as f:
    return decode(f.read())


def to_rgb(image: Image.Image) -> np.ndarray:
  """Grayscale, palette, RGBA, CMYK and 16-bit images as 8-bit RGB."""
  image.load()  # Truncated files fail here, inside the caller's error handling.
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
    # PIL's own conversion clips 16-bit values at 255; keep the high byte instead.
    array = (np.asarray(image, np.uint16) >> 8).astype(np.uint8)
    image = Image.fromarray(array)
  elif image.mode in ("I", "F"):
    image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
  elif image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode != "RGB":
    image = image.convert("RGB")
  return np.asarray(image, np.uint8)
