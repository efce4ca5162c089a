r"""Entry point: train or evaluate one model.

  python -m diffvit_jax.main --config configs/tiny_imagenet.py:diffvit_10m --workdir runs/x
  python -m diffvit_jax.main --config configs/digits.py:vit --workdir runs/d \
      --config.train.steps=100
  python -m diffvit_jax.main --workdir runs/x --mode eval

Training resumes from the latest checkpoint in --workdir. The evaluation modes
read the run's config from --workdir (`checkpointing.load_run_config`); a
--config given there must describe the same model and data set, and only its
`data` section is used (e.g. to point data.dir at where the data is now).
Anything the user can fix (config, data, checkpoints) ends with one paragraph
on stderr and a non-zero exit, never a traceback; SIGTERM/SIGINT save a checkpoint first.
"""

import json
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffvit_jax import config_cli, cpu_runtime
from diffvit_jax.errors import Preempted, UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py:vit. "
                                "Required to train; the evaluation modes read the run's.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "eval_corrupted"],
                  "What to do with the run in --workdir.")
flags.DEFINE_bool("best", False, "--mode eval: use the best checkpoint instead of the latest.")
flags.DEFINE_string("baseline_workdir", "",
                    "--mode eval_corrupted: the run that CE and mCE are relative to (e.g. the "
                    "ViT of the same size), itself evaluated with --mode eval_corrupted first.")
flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"],
                  "--mode eval_corrupted: the corruption severities to evaluate.")
flags.DEFINE_list("corruptions", [],
                  "--mode eval_corrupted: the corruptions to evaluate (default: all).")
flags.DEFINE_string("coordinator_address", "",
                    "Multi-host on plain hosts: host:port of process 0 (with --num_processes and "
                    "--process_id). On SLURM give none of the three and set "
                    "--config.train.distributed=True.")
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, 0 .. num_processes-1.")


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save); keeps its warnings and errors,
  without their tracebacks: a failed save ends the run with its own paragraph."""

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info = record.exc_text = None
    return record.levelno >= py_logging.WARNING


def _config_for(mode: str, flag_config, workdir: str):
  """The config of this command: --config to train, the run's own to evaluate."""
  from diffvit_jax.errors import ConfigError
  from diffvit_jax.training import checkpointing

  if mode == "train":
    if flag_config is None:
      raise ConfigError("--mode train needs --config, e.g. --config configs/digits.py:vit.")
    return flag_config
  if not workdir:
    raise ConfigError(f"--mode {mode} needs --workdir, the directory of a training run.")
  config = checkpointing.load_run_config(workdir)
  if flag_config is not None:
    checkpointing.check_same_run(flag_config, config, workdir)
    with config.unlocked():
      config.data = flag_config.data
  return config


def _run(flag_config, workdir: str, mode: str) -> dict:
  # Imported here so that a bad flag is reported before JAX/TF start up.
  from diffvit_jax import config_lib, distributed

  config = _config_for(mode, flag_config, workdir)
  # Before anything touches JAX: validation itself counts the (global) devices.
  distributed.initialize(config.train.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  import jax

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # The chief logs the run; the others only problems.
  config_lib.validate(config, mode=mode)
  from diffvit_jax.training import (
    loop as train,  # Only now pay for importing TensorFlow (CLU's writers).
  )

  if mode == "train":
    return train.train_and_evaluate(config, workdir)
  if mode == "eval_corrupted":
    from diffvit_jax.evaluation import robustness

    return robustness.evaluate_corrupted(
        config, workdir, baseline_workdir=FLAGS.baseline_workdir,
        corruptions=FLAGS.corruptions, severities=FLAGS.severities, best=FLAGS.best)
  return train.evaluate_checkpoint(config, workdir, best=FLAGS.best)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  try:
    result = _run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(json.dumps({"mode": FLAGS.mode, "workdir": FLAGS.workdir, **result}))


def run():
  # The process's set-up, before TensorFlow (it only serves CLU) and JAX initialise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  flags.mark_flags_as_required(["workdir"])
  try:
    cpu_runtime.apply_cpu_defaults()
    app.run(main, flags_parser=config_cli.flags_parser)
  except UserError as e:  # Raised while the config file itself was being loaded.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  run()
