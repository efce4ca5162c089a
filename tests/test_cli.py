"""`diffvit_jax.cli` and `config_cli`: the tools' flag parsing and its user errors."""

import os
import subprocess
import sys

import pytest
from absl import flags

from diffvit_jax import cli
from diffvit_jax.errors import ConfigError


@pytest.fixture
def tool_flags():
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The run.", flag_values=values)
  flags.DEFINE_integer("top_k", 5, "Classes.", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)
  return values


def test_flags_and_positionals_in_any_order(tool_flags):
  rest = cli.parse(tool_flags, ["a.png", "--workdir", "run", "--top_k=3", "b.png"],
                   prog="tool", usage="usage")
  assert rest == ["a.png", "b.png"]
  assert (tool_flags.workdir, tool_flags.top_k) == ("run", 3)


def test_each_parse_starts_from_the_defaults(tool_flags):
  cli.parse(tool_flags, ["--workdir", "run", "--top_k", "3"], prog="tool", usage="usage")
  cli.parse(tool_flags, ["--workdir", "other"], prog="tool", usage="usage")
  assert (tool_flags.workdir, tool_flags.top_k) == ("other", 5)


@pytest.mark.parametrize("argv, named", [([], "--workdir"), (["--workdir=r", "--bogus"], "bogus"),
                                         (["--workdir=r", "--top_k=many"], "top_k")])
def test_bad_command_lines_are_config_errors(tool_flags, argv, named):
  with pytest.raises(ConfigError, match=named) as error:
    cli.parse(tool_flags, argv, prog="tool", usage="usage")
  assert "--help" in str(error.value)


def test_help_prints_usage_and_flags(tool_flags, capsys):
  assert cli.parse(tool_flags, ["--help"], prog="tool", usage="Does things.") is None
  out = capsys.readouterr().out
  assert out.startswith("Does things.") and "--top_k" in out and "--workdir" in out


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module, args", [
    ("diffvit_jax.main", ["--workdir", "unused"]),
    ("diffvit_jax.tools.describe", []),
    ("diffvit_jax.tools.bench", []),
])
def test_a_mistyped_config_override_is_one_paragraph(module, args):
  result = subprocess.run(
      [sys.executable, "-m", module, "--config", "configs/digits.py:vit", *args,
       "--config.train.stpes=10"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: --config.train.stpes=10: config.train has no field 'stpes'; did you mean "
      "'steps'? Overrides name a field of the config, e.g. --config.train.steps=100."]
