"""The config schema shared by every config file, and the model sizes.

Config files in `configs/` start from `base_config()` and override fields, so
that every field the code reads exists in every config (a typo on the command
line is then an error, not a silently ignored setting).
"""

import ml_collections

ARCHS = ("vit", "diffvit", "diffvit2")

# Width, depth, classic heads, MLP width. Head size 32 for the classic ViT, so
# the differential kinds get num_heads // 2 pairs with q/k heads of 32 and
# value heads of 64. Chosen so that every model is within 3% of its nominal
# size in both protocols (tests/test_param_counts.py checks it on the real
# parameter trees).
MODEL_SIZES = {
    "10m": dict(width=320, depth=8, num_heads=10, mlp_dim=1280),
    "20m": dict(width=384, depth=11, num_heads=12, mlp_dim=1536),
    "30m": dict(width=448, depth=12, num_heads=14, mlp_dim=1792),
}


def model_config(**overrides) -> ml_collections.ConfigDict:
  """`config.model`: everything `models.build_model` reads."""
  m = ml_collections.ConfigDict()
  m.arch = "vit"  # 'vit' | 'diffvit' | 'diffvit2'
  m.width = 320
  m.depth = 8
  m.num_heads = 10  # heads of the classic ViT; differential kinds use num_heads // 2 pairs
  m.mlp_dim = 1280
  m.patch_size = 4
  m.pool = "gap"  # 'cls' | 'gap'
  m.posemb = "learn"  # 'learn' (std 0.02) | 'sincos2d'
  m.norm = "layernorm"  # 'layernorm' | 'rmsnorm' (block, final and head norms)
  m.attn_bias = True  # biases of the q/k/v projections (the output projection always has one)
  # Per-head norm of differential attention: 'rmsnorm' (paper) | 'layernorm' | 'none'.
  m.diff_head_norm = "rmsnorm"
  m.dropout = 0.0  # after attention / MLP projections, and on the embeddings
  m.attn_dropout = 0.0
  m.stoch_depth = 0.0  # drop-path rate of the last block (linear in depth, as timm)
  m.num_classes = 200
  m.attention_impl = "fused"  # 'fused' (jax.nn.dot_product_attention) | 'einsum'
  m.dtype = "float32"  # compute dtype ('float32' | 'bfloat16'); parameters stay float32
  m.update(overrides)
  return m


def data_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data`: what the input pipeline reads."""
  d = ml_collections.ConfigDict()
  d.source = "tiny_imagenet"  # 'tiny_imagenet' | 'image_folder' | 'digits'
  d.dir = ""  # TFDS data_dir (tiny_imagenet), root of <split>/<class>/<image> (image_folder)
  d.manual_dir = ""  # where tiny-imagenet-200.zip (or Tiny-ImageNet-C) was put by hand
  d.train_split = "train"
  d.eval_split = "validation"
  d.image_size = 96  # the model's input size; images are resized to it
  d.crop = "none"  # train crop: 'none' | 'random_resized' | 'pad_crop'
  d.crop_scale_min = 0.35  # random_resized: smallest area fraction
  d.flip = False
  d.randaugment_layers = 0  # 0 = RandAugment off
  d.randaugment_magnitude = 9
  d.train_corruption = ""  # a Tiny-ImageNet-C corruption applied at training time, '' = none
  d.train_severity = 0  # 1..5
  d.eval_corruption = ""  # evaluate on a corrupted validation set
  d.eval_severity = 0
  d.on_bad_image = "skip"  # image_folder: 'skip' (count and warn) | 'error'
  d.num_workers = 0  # grain worker processes (0 = in-process)
  d.prefetch = 2  # device prefetch depth
  d.mean = (0.485, 0.456, 0.406)
  d.std = (0.229, 0.224, 0.225)
  d.update(overrides)
  return d


def train_config(**overrides) -> ml_collections.ConfigDict:
  """`config.train`: optimisation, evaluation, checkpointing, logging."""
  t = ml_collections.ConfigDict()
  t.batch_size = 256  # global, over all devices and hosts
  t.eval_batch_size = 256  # global
  t.learning_rate = 1e-3  # peak
  t.warmup_steps = 0
  t.schedule = "cosine"  # 'cosine' (warmup then cosine to 0) | 'constant'
  t.num_epochs = 0.0  # used when steps is 0
  t.steps = 0  # wins when set
  t.weight_decay = 0.05
  # 'all' (the study) | 'matrices' (skip norms, biases, embeddings, lambdas).
  t.weight_decay_mask = "matrices"
  t.b1 = 0.9
  t.b2 = 0.999
  t.grad_clip = 0.0  # global-norm clip, 0 = off
  t.label_smoothing = 0.0
  t.mixup_alpha = 0.0  # 0 = off
  t.cutmix_alpha = 0.0  # 0 = off
  t.mix_prob = 1.0  # probability that a batch is mixed at all when mixup/cutmix are on
  t.seed = 0
  t.eval_every = 1000  # steps; evaluation also runs at the end
  t.checkpoint_every = 1000  # steps; a checkpoint is also saved at the end
  t.keep_checkpoints = 3
  t.log_every = 50
  t.on_nonfinite = "stop"  # 'stop' | 'skip' the update
  t.profile = False
  t.distributed = False  # jax.distributed.initialize() for multi-host
  t.update(overrides)
  return t


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = ""  # experiment label used by reports, e.g. 'vit_10m,v2'
  config.protocol = ""
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  return config


_CHOICES = {
    "model.arch": ARCHS,
    "model.pool": ("cls", "gap"),
    "model.posemb": ("learn", "sincos2d"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.diff_head_norm": ("rmsnorm", "layernorm", "none"),
    "model.attention_impl": ("fused", "einsum"),
    "model.dtype": ("float32", "bfloat16"),
    "data.source": ("tiny_imagenet", "tiny_imagenet_c", "image_folder", "digits"),
    "data.crop": ("none", "random_resized", "pad_crop"),
    "data.on_bad_image": ("skip", "error"),
    "train.schedule": ("cosine", "constant"),
    "train.weight_decay_mask": ("all", "matrices"),
    "train.on_nonfinite": ("stop", "skip"),
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config, *, workdir: str | None = None, mode: str = "train",
             num_devices: int | None = None) -> None:
  """Checks a config before any work is done; raises ConfigError naming the field.

  Everything here is cheap and catches what would otherwise fail minutes in,
  deep inside jit or a data worker, or silently train something else.
  """
  import os

  from diffvit_jax.errors import ConfigError

  def fail(field, message):
    raise ConfigError(f"config.{field}: {message}")

  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      fail(field, f"{_get(config, field)!r} is not one of {', '.join(map(repr, choices))}.")
  m, d, t = config.model, config.data, config.train
  for field in ("model.width", "model.depth", "model.num_heads", "model.mlp_dim",
                "model.patch_size", "model.num_classes", "data.image_size",
                "train.batch_size", "train.eval_batch_size", "train.log_every",
                "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints"):
    value = _get(config, field)
    if not isinstance(value, int) or value <= 0:
      fail(field, f"must be a positive integer, got {value!r}.")
  if d.image_size % m.patch_size:
    fail("data.image_size", f"{d.image_size} is not divisible by model.patch_size="
         f"{m.patch_size}; the patch grid must tile the image.")
  if m.width % m.num_heads:
    fail("model.width", f"{m.width} is not divisible by model.num_heads={m.num_heads}.")
  if m.arch != "vit":
    if m.num_heads % 2:
      fail("model.num_heads", f"{m.num_heads} is odd; differential attention pairs heads "
           f"({m.arch} uses num_heads // 2 pairs), so num_heads must be even.")
    if (m.width // (m.num_heads // 2)) % 2:
      fail("model.width", f"the differential head size width / (num_heads // 2) = "
           f"{m.width // (m.num_heads // 2)} is odd and cannot be split into two halves.")
  for field in ("model.dropout", "model.attn_dropout", "model.stoch_depth",
                "train.label_smoothing", "train.mix_prob"):
    if not 0.0 <= _get(config, field) <= 1.0:
      fail(field, f"must be in [0, 1], got {_get(config, field)!r}.")
  if mode == "train":
    if not (t.steps and t.steps > 0) and not (t.num_epochs and t.num_epochs > 0):
      fail("train.steps", "neither train.steps nor train.num_epochs is > 0: say how long to "
           "train, e.g. --config.train.steps=1000 or --config.train.num_epochs=50.")
    if not t.learning_rate > 0:
      fail("train.learning_rate", f"must be > 0, got {t.learning_rate!r}.")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0:
      fail("train", "warmup_steps, weight_decay and grad_clip must be >= 0.")
  if d.train_corruption or d.eval_corruption:
    from diffvit_jax.data import corruptions

    for field in ("data.train_corruption", "data.eval_corruption"):
      name = _get(config, field)
      if name and name not in corruptions.CORRUPTIONS:
        fail(field, f"{name!r} is not a known corruption: "
             f"{', '.join(sorted(corruptions.CORRUPTIONS))}.")
    for field in ("data.train_severity", "data.eval_severity"):
      corrupt = _get(config, field.replace("severity", "corruption"))
      if corrupt and _get(config, field) not in (1, 2, 3, 4, 5):
        fail(field, f"must be 1..5 when a corruption is set, got {_get(config, field)!r}.")
  if num_devices is None:
    import jax

    num_devices = jax.device_count()
  for field in ("train.batch_size", "train.eval_batch_size"):
    if _get(config, field) % num_devices:
      fail(field, f"the global batch {_get(config, field)} is not divisible by the "
           f"{num_devices} devices; batch sizes in configs are global.")
  if workdir is not None:
    if not workdir:
      raise ConfigError("--workdir is empty: give a directory for checkpoints and logs.")
    parent = workdir
    while not os.path.exists(parent):
      parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise ConfigError(f"--workdir {workdir!r} is not writable (checked {parent!r}).")
  from diffvit_jax.data import input_pipeline

  input_pipeline.get_dataset_info(d)  # Raises DataError with how to get a missing data set.
