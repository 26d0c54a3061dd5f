"""User-facing errors.

`EmlocError` is raised for problems the user can fix (a bad path, a wrong format, a ratio out of
range...). The CLI prints its message on one line and exits non-zero without a traceback. Any other
exception is a bug and propagates normally.
"""


class EmlocError(Exception):
    """A problem with the user's inputs, with a message that names the problem and the fix."""
