"""Writing a file whole or not at all: to a temporary name beside it, then renamed over it."""

import os
from pathlib import Path

from lean.errors import LeanError, reason


def write_atomically(path, write):
    """write(temporary), then rename the temporary to `path`: a crash mid-write never leaves half a file there,
    and a failed write (a full disk: torch.save says "unexpected pos") removes its temporary and is one line."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        raise LeanError(f"{path}: cannot write ({reason(error)}); the file there before, if any, is kept") from None
