r"""The embedded default: scikit-learn's 8x8 handwritten digits, no download.

  --config configs/digits.py:vit     (or :diffvit, :diffvit2)

What `./launch.sh quickstart` trains on the CPU in a couple of minutes per
model. Both architectures share every setting except `model.arch`.
"""

from diffvit_jax import config_lib


def get_config(arch: str = "vit"):
  if arch not in config_lib.archs():
    raise ValueError(f"Bad config argument {arch!r}: expected one of {config_lib.archs()}.")
  config = config_lib.base_config()
  config.name = f"{arch}_digits"
  config.protocol = "digits"
  # 8x8 inputs in 2x2 patches: 16 tokens keep a step cheap on 2 CPU cores. The step count
  # and the crop are chosen in benchmarks/RESULTS.md ("Quickstart (digits, CPU)").
  config.model = config_lib.model_config(
      arch=arch, width=64, depth=4, num_heads=4, mlp_dim=128, patch_size=2, pool="gap",
      posemb="learn", norm="layernorm", attn_bias=True, stoch_depth=0.1, num_classes=10)
  config.data.update(source="digits", image_size=8, crop="none", flip=False,
                     randaugment="", num_workers=0)
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.5, 0.5, 0.5)
  # The run is stated in steps, so the warmup is too; the lr follows the batch (linear rule).
  config.train.update(
      batch_size=128, eval_batch_size=120, learning_rate=5e-3, lr_reference_batch=128,
      warmup_steps=50, warmup_epochs=0.0, steps=1000, weight_decay=0.05,
      weight_decay_mask="matrices", grad_clip=1.0, label_smoothing=0.1, eval_every=250,
      checkpoint_every=500, log_every=100)
  return config
