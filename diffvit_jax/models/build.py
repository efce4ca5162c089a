"""`config.model` -> a `ViT`, after the one validation of the config schema."""

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import attention_impl, registry
from diffvit_jax.models.vit import ViT


def check_image_size(model_config, image_size: int) -> None:
  patch = model_config.patch_size
  if image_size < 1 or image_size % patch:
    raise ConfigError(f"The image size {image_size} (config.data.image_size) must be a positive "
                      f"multiple of config.model.patch_size={patch}.")


def build_model(model_config, attention: str | attention_impl.Resolved | None = None) -> ViT:
  """The ViT of `config.model`, its fields taken from the config as they are.

  `attention`: a path resolved by `attention_impl.resolve` (the trainer's),
  a path name to use instead of the config's (e.g. 'einsum' to read attention
  maps), or None to resolve the config's here. The layers are plain flax ones
  (`dot_general` None); the trainer gives them a backend's own form.
  """
  config_lib.validate_model(model_config)
  if attention is None:
    attention = attention_impl.resolve(model_config)
  fields = model_config.to_dict()
  if isinstance(attention, str):
    if attention not in attention_impl.PATHS:
      raise ValueError(f"build_model needs a resolved attention path {attention_impl.PATHS}, "
                       f"not {attention!r}.")
    fields["attention_impl"] = attention
  else:
    fields.update(attention_impl=attention.impl, attention_chunk_mib=attention.chunk_mib)
  del fields["cpu_dense_grad"]  # a backend measure: the trainer sets the Dense dot_general
  # Each kind's own fields are in every config; the ViT takes its arch's, for its module.
  own = {name: fields.pop(name) for name in registry.config_fields()}
  fields["arch_fields"] = {name: own[name] for name in registry.kind(model_config.arch)
                           .config_fields}
  return ViT(**fields)
