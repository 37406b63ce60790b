"""The one kind of failure a user can fix."""


class LeanError(Exception):
    """Bad input: a file, folder or argument that lean cannot use.

    The message is one line that names the thing and what is wrong with it;
    the command line prints it without a traceback and exits non-zero.
    """
