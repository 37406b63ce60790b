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


def refusal(error):
    """Why a weights-only torch.load refused a file, in a few words: torch's own message advises loading it
    unsafely, which lean never does."""
    detail = str(error).partition("WeightsUnpickler error:")[2]
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    if not first or first.startswith("Unsupported operand"):
        return "not a file torch.save writes"
    return f"holds more than tensors and plain values: {first.split('. ')[0]}"
