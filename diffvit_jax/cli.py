"""Command-line parsing for the tools: absl flags, and user errors as one paragraph.

Each tool defines its flags in its own `flags.FlagValues` rather than absl's
process-wide `flags.FLAGS`: the tools and `main` all have a `--workdir`, and
with one registry, importing two of them in one process (the tests, a
notebook) would fail on the duplicate definition. Each parse also starts from
the defaults, so calling a tool's `main(argv)` twice does not carry flag
values from the first call into the second.
"""

import sys

from absl import flags

from diffvit_jax.errors import ConfigError, UserError

HELP_FLAGS = ("-h", "-help", "--help", "--helpfull", "--helpshort")


def parse(flag_values: flags.FlagValues, argv: list[str] | None, *, prog: str,
          usage: str) -> list[str] | None:
  """Parses `argv` (no program name; None: sys.argv) into `flag_values`.

  Returns the positional arguments, or None after printing the usage when help
  was asked for. A missing, unknown or invalid flag raises ConfigError.
  """
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  if any(a in HELP_FLAGS for a in argv):
    print(f"{usage.strip()}\n\nflags:\n{flags_help(flag_values)}")
    return None
  flag_values.unparse_flags()
  try:
    return flag_values([prog, *argv])[1:]
  except flags.Error as e:
    raise ConfigError(f"{prog}: {e} (--help lists the flags).") from None


def flags_help(flag_values: flags.FlagValues) -> str:
  """One line per flag: name, help, default (absl's own help groups flags by file path)."""
  lines = []
  for name in sorted(flag_values):
    flag = flag_values[name]
    spelled = f"--[no]{name}" if flag.boolean else f"--{name}"
    default = "no default" if flag.default is None else f"default {flag.default_as_str}"
    lines.append(f"  {spelled}: {flag.help} ({default})")
  return "\n".join(lines)


def report(error: UserError) -> int:
  """Prints a user error as one paragraph on stderr; returns the exit code."""
  print(f"error: {error}", file=sys.stderr)
  return error.exit_code
