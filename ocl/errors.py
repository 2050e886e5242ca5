"""User-facing errors.

Anything a user can cause (a missing file, a bad shape, a label out of range, a bad
config value) is raised as :class:`OCLError` with a message that says what is wrong,
where, and how to fix it. The CLI prints the message without a traceback and exits
non-zero; programming errors stay ordinary exceptions with tracebacks.
"""


class OCLError(Exception):
    """An error caused by the user's input, with a message meant to be read by them."""
