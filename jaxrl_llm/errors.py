"""The one exception type for bad input a user can fix.

`UserError` is a `ValueError` (so `except ValueError` and `pytest.raises(ValueError)` still
catch it) raised for anticipated problems: a config value, a missing file or checkpoint, a
dataset, a reward function's output, a device count. Its message names the cause and, where
one exists, the fix. The CLI prints it as one line with exit status 2; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, named: `str(error)` is the whole message a user needs."""





class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; the CLI exits with 128 + the signal's number. A
    `KeyboardInterrupt`, like Ctrl-C, so that no `except Exception` on the way (a reward
    function's error handling, say) mistakes it for a failure."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
__all__ = ["Interrupted", "UserError"]
