"""Pixels -> the model's input: float32 (x / 255 - mean) / std, done inside the jitted steps.

Batches cross to the device as uint8 pixels (a quarter of float32's bytes through the
workers' shared memory and the host-to-device link); the train and eval steps turn them
into the model's input with this one function, which also works on numpy arrays (the
tools that feed a model on the host). A floating-point array is already a model input
and is returned as it is.
"""

import jax.numpy as jnp
import numpy as np


def model_input(images, mean, std):
  """uint8 [..., 3] pixels -> float32 normalised per channel; floating arrays unchanged."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8:
    raise TypeError(f"Images must be uint8 pixels or a floating-point model input, got "
                    f"{images.dtype}.")
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(mean, np.float32) / std
  return images.astype(np.float32) * scale + offset


def pixels(images, mean, std) -> np.ndarray:
  """Model inputs (or uint8 pixels) -> float RGB in [0, 1], for display."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return np.clip(images * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0.0, 1.0)
