"""The one kind of failure a user can fix."""


class LeanError(Exception):
    """Bad input: a file, folder or argument that lean cannot use.

    The message is one line that names the thing and what is wrong with it;
    the command line prints it without a traceback and exits non-zero.
    """


def reason(error):
    """The first line of an exception's message, or its type's name when it has none: for one-line errors."""
    lines = str(error).splitlines()
    return lines[0] if lines and lines[0] else type(error).__name__
