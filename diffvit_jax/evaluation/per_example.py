"""Each validation example's label and top-1 / top-5 correctness at the final evaluation.

The trainer writes `per_example.npz` into the workdir at its last step (the
chief process only, after every process took part in the evaluation), so the
report can pair two runs image by image: McNemar's test on the discordant
images of a seed, and the image level of the two-level bootstrap. Arrays, in
order of the example's index in the evaluation split:

  index   int32  the example's index in the split (0 .. num_eval - 1, each once)
  label   int32
  top1    bool   the model's top-1 prediction is the label
  top5    bool   the label is among its top 5
  loss    float32  its cross-entropy
  step    ()     the training step of the parameters evaluated
"""

import functools
import os

import jax
import numpy as np
import optax

from diffvit_jax import files
from diffvit_jax.data import normalise
from diffvit_jax.errors import DataError

PER_EXAMPLE = "per_example.npz"


def _correctness(state, batch, *, num_classes: int, mean, std):
  images = normalise.model_input(batch["image"], mean, std)  # uint8 pixels, as eval_step
  logits = state.apply_fn({"params": state.params}, images, train=False)
  labels = batch["label"]
  top = jax.lax.top_k(logits, min(5, num_classes))[1]
  return dict(index=batch["index"], label=labels, mask=batch["mask"],
              top1=top[:, 0] == labels, top5=(top == labels[:, None]).any(-1),
              loss=optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def evaluate_per_example(state, config, mesh) -> dict[str, np.ndarray]:
  """index, label, top1, top5 of every real example of the evaluation split, sorted by index.

  The outputs are replicated over the mesh, so every process holds the whole
  global batch (the gather of a multi-process evaluation); padding
  (`mask` 0) is dropped. DataError if an example is missing or seen twice.
  """
  from diffvit_jax.data import input_pipeline, sharding

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = jax.jit(functools.partial(_correctness, num_classes=config.model.num_classes,
                                   mean=tuple(config.data.mean), std=tuple(config.data.std)),
                 in_shardings=(replicated, data), out_shardings=replicated)
  parts = []
  process, processes = jax.process_index(), jax.process_count()
  for j, host_batch in enumerate(input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.train.eval_batch_size,
      process_index=process, process_count=processes)):
    # This process reads examples process, process + P, ... (`input_pipeline.PaddedShard`):
    # the index travels with its example into the global batch, whatever the device order.
    size = len(host_batch["label"])
    host_batch = {**host_batch,
                  "index": (process + (j * size + np.arange(size)) * processes).astype(np.int32)}
    out = jax.device_get(step(state, sharding.shard_batch(host_batch, mesh)))
    real = np.asarray(out.pop("mask")) > 0
    parts.append({k: np.asarray(v)[real] for k, v in out.items()})
  merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(merged["index"], kind="stable")
  merged = {k: v[order] for k, v in merged.items()}
  index = merged["index"]
  if len(index) and not np.array_equal(index, np.arange(len(index))):
    raise DataError(f"The per-example evaluation saw {len(index)} examples but not each index "
                    f"0..{len(index) - 1} once: the evaluation split was not read exactly once.")
  return dict(index=index.astype(np.int32), label=merged["label"].astype(np.int32),
              top1=merged["top1"].astype(bool), top5=merged["top5"].astype(bool),
              loss=merged["loss"].astype(np.float32))


def write_final(state, config, mesh, workdir: str, step: int) -> str | None:
  """Evaluates per example and writes `per_example.npz` (chief only); returns its path.

  Skipped (None) when the file already holds this step, as when a finished
  run is started again. Every process must call it: the evaluation is collective.
  """
  path = os.path.join(workdir, PER_EXAMPLE)
  previous = read(workdir)
  if previous is not None and int(previous["step"]) == step:
    return None
  arrays = evaluate_per_example(state, config, mesh)
  if jax.process_index() != 0:
    return None
  files.write_atomically(path, lambda tmp: np.savez_compressed(tmp, step=np.int64(step), **arrays),
                         suffix=".tmp.npz")  # savez would append .npz to another name
  return path


def read(workdir: str) -> dict[str, np.ndarray] | None:
  """The arrays of `per_example.npz` in `workdir`, None when there is none."""
  path = os.path.join(workdir, PER_EXAMPLE)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{path} cannot be read ({e}); delete it (the report then leaves this "
                    "run's per-image evidence out).") from e
