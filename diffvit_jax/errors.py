"""Errors that reach the user as one clear paragraph and a non-zero exit.

Raise these (not bare exceptions) for anything a user can fix: a bad config
value, a missing data set, a checkpoint from another config. Entry points
catch `UserError`, print its message without a traceback and exit non-zero.
"""

import difflib


def did_you_mean(name: str, names) -> str:
  """'; did you mean 'x'?' for the valid name nearest `name`, or '' if none is near."""
  close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


class UserError(Exception):
  """Something the user can fix; the message says what and how."""

  exit_code = 2


class ConfigError(UserError):
  """A config value is invalid or inconsistent; the message names the field."""


class DataError(UserError):
  """A data set is missing, unreadable or does not match the config."""


class CheckpointError(UserError):
  """A checkpoint cannot be used for this run (other config, corrupt files)."""


class DivergenceError(UserError):
  """Training produced a non-finite loss or gradient norm."""

  exit_code = 3


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint; rerunning resumes it.

  Not a UserError: nothing is wrong. The exit code is the shell's for the
  signal (143 for SIGTERM, 130 for SIGINT), so a job script stops rather
  than starting the next run.
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code
