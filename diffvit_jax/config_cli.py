"""Command lines that take `--config FILE[:ARG]`: a bad `--config.*` override is one paragraph.

ml_collections reports a misspelt override (`--config.train.stpes=10`) as
chained tracebacks; `parse` turns it, and any other override or config file it
cannot use, into a ConfigError naming the field and the nearest valid name.
`flags_parser` is that for `absl.app.run(main, flags_parser=...)`: it prints the
paragraph and exits 2.
"""

import importlib.util
import sys

from absl import app, flags
from ml_collections import config_dict

from diffvit_jax import cli
from diffvit_jax.errors import ConfigError, UserError, did_you_mean


def parse(flag_values: flags.FlagValues, argv: list[str], config_flag: str = "config"):
  """flag_values(argv) (argv[0] is the program); ConfigError for a bad --config or override."""
  try:
    return flag_values(argv)
  except Exception as e:
    if isinstance(e, flags.Error) and f"--{config_flag}" not in str(e):
      raise  # another flag: absl's own message
    raise _config_error(argv, config_flag, e) from None


def flags_parser(argv: list[str]):
  """`absl.app.run`'s flags_parser for the global flags: user errors are one paragraph, exit 2."""
  try:
    return parse(flags.FLAGS, argv)
  except UserError as e:
    sys.exit(cli.report(e))
  except flags.Error:
    return app.parse_flags_with_usage(argv)  # absl's usage message for the other flags


def _arguments(argv: list[str], config_flag: str) -> tuple[str | None, list[tuple[str, str]]]:
  """(the config file argument, [(dotted field, the whole argument)] of the overrides)."""
  path, overrides = None, []
  for i, arg in enumerate(argv[1:], start=1):
    name, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-"):
      continue
    if name == config_flag:
      path = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith(config_flag + "."):
      overrides.append((name[len(config_flag) + 1:], arg))
  return path, overrides


def _load(path: str):
  """get_config(ARG) of FILE for 'FILE[:ARG]', as ml_collections' config file flag loads it."""
  file, _, arg = path.partition(".py:")
  file = file if file.endswith(".py") else file + ".py"
  spec = importlib.util.spec_from_file_location("_config_cli_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_field(config, dotted: str) -> str | None:
  """Why `dotted` names no field of `config`, or None if it does."""
  node, seen = config, "config"
  for part in dotted.split("."):
    if not isinstance(node, config_dict.ConfigDict):
      return f"{seen} is a value, not a section, so it has no field {part!r}"
    if part not in node:
      return f"{seen} has no field {part!r}{did_you_mean(part, node.keys())}"
    node, seen = node[part], f"{seen}.{part}"
  return None


def _last_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  last = lines[-1]
  return last[1:-1] if len(last) > 1 and last[0] == last[-1] and last[0] in "'\"" else last


def _config_error(argv: list[str], config_flag: str, error: BaseException) -> ConfigError:
  path, overrides = _arguments(argv, config_flag)
  if path is None:
    return ConfigError(f"--{config_flag}: {_last_line(error)}")
  try:
    config = _load(path)
  except Exception as e:  # the config file itself
    return ConfigError(f"--{config_flag}={path}: the config file failed: {_last_line(e)}")
  for dotted, arg in overrides:
    why = _unknown_field(config, dotted)
    if why:
      end = "" if why.endswith("?") else "."
      return ConfigError(f"{arg}: {why}{end} Overrides name a field of the config, e.g. "
                         f"--{config_flag}.train.steps=100.")
  return ConfigError(f"{_last_line(error).removeprefix('flag ')} (overrides of --{config_flag} "
                     "take the type of the field they set).")
