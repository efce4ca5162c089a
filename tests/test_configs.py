"""The experiment configs say what the protocols say."""

import importlib.util
import os

import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import registry
from diffvit_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# Every field of the Tiny ImageNet configs, written out: any change to a recipe (or a new
# field in the schema) fails here and has to be made on purpose.
MODEL_SIZES = {
    "10m": {"model.width": 320, "model.depth": 8, "model.num_heads": 10, "model.mlp_dim": 1280},
    "20m": {"model.width": 384, "model.depth": 11, "model.num_heads": 12, "model.mlp_dim": 1536},
    "30m": {"model.width": 448, "model.depth": 12, "model.num_heads": 14, "model.mlp_dim": 1792},
}
SHARED = {
    "model.attention_chunk_mib": 0, "model.attention_impl": "auto", "model.attn_dropout": 0.0,
    "model.diff_head_norm": "rmsnorm", "model.dtype": "bfloat16", "model.num_classes": 200,
    "model.posemb": "learn", "model.remat": False, "model.cpu_dense_grad": True,
    "data.source": "tiny_imagenet", "data.dir": "", "data.manual_dir": "",
    "data.train_split": "train", "data.eval_split": "validation", "data.crop_scale_min": 0.35,
    "data.train_corruption": "", "data.train_severity": 0, "data.eval_corruption": "",
    "data.eval_severity": 0, "data.on_bad_image": "skip", "data.read_threads": 2,
    "data.prefetch": 2, "data.mean": (0.485, 0.456, 0.406), "data.std": (0.229, 0.224, 0.225),
    "data.randaugment_interpolation": "bicubic", "data.corruption_jpeg": True,
    "data.clutter": {"fragments": 0, "digit_scale": 3, "fragment_size": 8, "seed": 0},
    "train.eval_batch_size": 256, "train.schedule": "cosine", "train.num_epochs": 50.0,
    "train.steps": 0, "train.b1": 0.9, "train.b2": 0.999, "train.mix_prob": 1.0,
    "train.seed": 0, "train.eval_every": 500, "train.checkpoint_every": 500,
    "train.keep_checkpoints": 3, "train.log_every": 50, "train.on_nonfinite": "stop",
    "train.profile": False, "train.distributed": False, "train.microbatches": "auto",
    "train.device_memory_gib": 0.0, "train.stop_check_every": 100,
    "analysis.equivalence_margin": 1.0, "analysis.alpha": 0.05, "analysis.level": "",
}
PROTOCOLS = {
    # The study: fixed lr and warmup steps at its global batches, no augmentation at all.
    "seed": {
        "model.patch_size": 8, "model.pool": "cls", "model.norm": "rmsnorm",
        "model.attn_bias": False, "model.dropout": 0.1, "model.stoch_depth": 0.0,
        "data.image_size": 64, "data.crop": "none", "data.flip": False, "data.randaugment": "",
        "data.num_workers": "auto",
        "train.learning_rate": 1e-4, "train.lr_reference_batch": 0, "train.warmup_steps": 500,
        "train.warmup_epochs": 0.0, "train.weight_decay": 1e-2, "train.weight_decay_mask": "all",
        "train.grad_clip": 0.0, "train.label_smoothing": 0.0, "train.mixup_alpha": 0.0,
        "train.cutmix_alpha": 0.0,
    },
    "v2": {
        "model.patch_size": 4, "model.pool": "gap", "model.norm": "layernorm",
        "model.attn_bias": True, "model.dropout": 0.0, "model.stoch_depth": 0.1,
        "data.image_size": 96, "data.crop": "random_resized", "data.flip": True,
        "data.randaugment": "rand-m9-mstd0.5-inc1", "data.num_workers": "auto",
        "train.batch_size": 512, "train.learning_rate": 1e-3, "train.lr_reference_batch": 512,
        "train.warmup_steps": 0, "train.warmup_epochs": 5.0, "train.weight_decay": 0.05,
        "train.weight_decay_mask": "matrices", "train.grad_clip": 1.0,
        "train.label_smoothing": 0.1, "train.mixup_alpha": 0.8, "train.cutmix_alpha": 1.0,
    },
}
SEED_BATCH = {"10m": 2048, "20m": 1024, "30m": 1024}  # 512 / 256 per GPU on 4 GPUs


def flat(config) -> dict:
  out = {}
  for key, value in config.to_dict().items():
    if isinstance(value, dict):
      out.update({f"{key}.{name}": v for name, v in value.items()})
    else:
      out[key] = value
  return out


@pytest.mark.parametrize("protocol", ["seed", "v2"])
@pytest.mark.parametrize("size", ["10m", "20m", "30m"])
@pytest.mark.parametrize("arch", list(registry.ARCHS))
def test_every_value_of_the_protocols_is_pinned(arch, size, protocol):
  expected = {"name": f"{arch}_{size},{protocol}", "protocol": protocol, "model.arch": arch,
              **SHARED, **MODEL_SIZES[size], **PROTOCOLS[protocol]}
  if protocol == "seed":
    expected["train.batch_size"] = SEED_BATCH[size]
  assert flat(load_config("tiny_imagenet", f"{arch}_{size},{protocol}")) == expected


# (global batch, warmup steps, total steps, peak lr) of the v2 recipe on Tiny ImageNet's
# 100,000 training images: 5 and 50 epochs rounded up to whole steps, 1e-3 * batch / 512.
V2_AT_BATCH = [(256, 1954, 19532, 5e-4), (512, 977, 9766, 1e-3), (1024, 489, 4883, 2e-3)]


@pytest.mark.parametrize("batch,warmup,total,peak", V2_AT_BATCH)
def test_v2_batch_override_keeps_the_recipe(batch, warmup, total, peak):
  config = load_config("tiny_imagenet", "diffvit_20m,v2")
  config.train.batch_size = batch
  recipe = optim.derive_recipe(config.train, 100_000)
  assert (recipe.warmup_steps, recipe.total_steps) == (warmup, total)
  assert recipe.peak_learning_rate == pytest.approx(peak, rel=1e-12)
  assert recipe.warmup_epochs == pytest.approx(5.0, abs=batch / 100_000)
  assert recipe.epochs == pytest.approx(50.0, abs=batch / 100_000)
  schedule = optim.learning_rate_schedule(config.train, total, num_train_examples=100_000)
  assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
  assert float(schedule(warmup // 2)) < peak * 0.51


@pytest.mark.parametrize("batch", [256, 1024, 2048])
def test_seed_keeps_the_study_numbers_at_any_batch(batch):
  config = load_config("tiny_imagenet", "vit_30m,seed")
  config.train.batch_size = batch
  recipe = optim.derive_recipe(config.train, 100_000)
  assert recipe.warmup_steps == 500
  assert recipe.peak_learning_rate == 1e-4


def test_digits_scales_lr_but_keeps_its_steps():
  config = load_config("digits", "vit")
  assert (config.train.steps, config.train.warmup_steps, config.train.warmup_epochs) == (
      1000, 50, 0.0)
  config.train.batch_size = 256
  recipe = optim.derive_recipe(config.train, 1437)
  assert (recipe.total_steps, recipe.warmup_steps) == (1000, 50)
  assert recipe.peak_learning_rate == pytest.approx(1e-2)


def test_lr_scaling_switches_off():
  config = load_config("tiny_imagenet", "vit_10m,v2")
  config.train.update(batch_size=1024, lr_reference_batch=0)
  assert optim.derive_recipe(config.train, 100_000).peak_learning_rate == 1e-3


def test_warmup_in_epochs_needs_the_data_set_size():
  config = load_config("tiny_imagenet", "vit_10m,v2")
  with pytest.raises(ConfigError, match="warmup_epochs"):
    optim.learning_rate_schedule(config.train, 1000)


@pytest.mark.parametrize("protocol", ["seed", "v2"])
@pytest.mark.parametrize("size", ["10m", "20m", "30m"])
def test_pairs_differ_only_in_arch(protocol, size):
  vit = load_config("tiny_imagenet", f"vit_{size},{protocol}").to_dict()
  diff = load_config("tiny_imagenet", f"diffvit_{size},{protocol}").to_dict()
  assert vit["model"].pop("arch") == "vit" and diff["model"].pop("arch") == "diffvit"
  vit.pop("name"), diff.pop("name")
  assert vit == diff


def test_v2_is_the_default_protocol():
  assert load_config("tiny_imagenet", "vit_10m").to_dict() == load_config(
      "tiny_imagenet", "vit_10m,v2").to_dict()


def test_bad_config_argument_is_explained():
  with pytest.raises(ValueError, match="<arch>_<size>"):
    load_config("tiny_imagenet", "vit_15m")


@pytest.mark.parametrize("field,value,named", [
    ("data.image_size", 31, "data.image_size"),
    ("model.width", 33, "model.width"),
    ("model.num_heads", 1, "model.num_heads"),
    ("model.arch", "transformer", "model.arch"),
    ("data.source", "imagenet", "data.source"),
    ("train.learning_rate", 0.0, "train.learning_rate"),
    ("train.batch_size", 30, "train.batch_size"),
    ("train.warmup_epochs", -1.0, "train.warmup_epochs"),
    ("train.warmup_steps", -5, "train.warmup_steps"),
    ("train.lr_reference_batch", -128, "train.lr_reference_batch"),
    ("train.warmup_epochs", 2.0, "train.warmup_epochs"),  # digits also sets warmup_steps
])
def test_validate_names_the_field(field, value, named):
  config = load_config("digits", "diffvit")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    config_lib.validate(config, num_devices=4)
