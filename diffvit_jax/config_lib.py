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
  m.diff_head_norm = "rmsnorm"  # per-head norm of differential attention: 'rmsnorm' | 'layernorm' | 'none'
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
  t.weight_decay_mask = "matrices"  # 'all' (the study) | 'matrices' (skip norms, biases, embeddings, lambdas)
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
