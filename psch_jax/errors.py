"""The one exception type for bad user input.

Library code raises `UserError` when the input a user controls (a config, a file, a
dataset, a checkpoint) is wrong; its message names the problem and the fix. `main.py`
and the other command-line entries print it and exit with code 2.
"""


class UserError(ValueError):
  """Bad user input: the message says what is wrong and how to fix it."""
