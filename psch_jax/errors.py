"""The one exception type for bad user input.

Library code raises `UserError` when the input a user controls (a config, a file, a
dataset, a checkpoint) is wrong; its message names the problem and the fix. Every
command line (`psch_jax.cli.run`) prints it as "error: ..." and exits with code 2.
"""


class UserError(ValueError):
  """Bad user input: the message says what is wrong and how to fix it."""


# The exit code of every command line on bad input.
EXIT_BAD_INPUT = 2


def flag_error_message(error: BaseException) -> str:
  """The readable message of a flag-parsing error: ml_collections wraps the KeyError
  of a --config.<field> the config does not have, whose str() is a repr, in an
  AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    return f"the config has no field {error.args[0]}"
  return str(error)
