"""The experiment configs say what the protocols say."""

import importlib.util
import os

import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("size,batch", [("10m", 2048), ("20m", 1024), ("30m", 1024)])
def test_seed_protocol_is_the_study(size, batch):
  for arch in ("vit", "diffvit"):
    c = load_config("tiny_imagenet", f"{arch}_{size},seed")
    assert c.train.warmup_steps == 500
    assert c.train.learning_rate == 1e-4
    assert c.train.weight_decay == 1e-2 and c.train.weight_decay_mask == "all"
    assert c.train.schedule == "cosine"
    assert c.train.batch_size == batch
    assert c.train.num_epochs == 50
    assert c.data.image_size == 64 and c.model.patch_size == 8
    assert c.model.pool == "cls" and c.model.norm == "rmsnorm" and not c.model.attn_bias
    assert c.model.dropout == 0.1
    # No augmentation of any kind.
    assert c.data.crop == "none" and not c.data.flip and not c.data.randaugment
    assert c.train.mixup_alpha == 0 and c.train.cutmix_alpha == 0
    assert c.train.label_smoothing == 0 and c.model.stoch_depth == 0


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
])
def test_validate_names_the_field(field, value, named):
  config = load_config("digits", "diffvit")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    config_lib.validate(config, num_devices=4)
