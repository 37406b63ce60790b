"""Writing a file whole or not at all, and never over a file the command reads or did not write."""

import json
import os
from pathlib import Path, PurePosixPath

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
    except BaseException:  # a check of what was written failed, or Ctrl-C: nothing half-made stays behind
        temporary.unlink(missing_ok=True)
        raise


def same_file(a, b):
    """Whether two paths name one file (through links and relative parts), whether it exists yet or not."""
    return Path(a).resolve() == Path(b).resolve()


def check_output(path, flag, inputs=(), ours=None):
    """One line, before any work, where the output `path` is one of the command's `inputs`, or a file already
    there that `ours(path)` does not take for this command's own output: no command writes over a file it
    reads or one it did not write. None (no such output) passes."""
    if path is None:
        return
    if any(same_file(path, source) for source in inputs):
        raise LeanError(f"{flag} {path}: is one of this command's inputs; name another file")
    if ours is not None and Path(path).is_file() and not ours(path):
        raise LeanError(f"{flag} {path}: a file this command did not write is there; name another file")


def json_or_none(path):
    """The JSON value in the file at `path`, or None where it holds none."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def distinct(names, taken=lambda name: False):
    """`names`, each one that another before it already is (letter case aside, as some file systems take it), or
    that `taken(name)` says is not free, made another by a number: photo.png, photo-1.png."""
    result, used = [], set()
    for name in names:
        suffix = PurePosixPath(name).suffix
        stem, k, candidate = name[: len(name) - len(suffix)], 0, name
        while candidate.lower() in used or taken(candidate):
            k += 1
            candidate = f"{stem}-{k}{suffix}"
        used.add(candidate.lower())
        result.append(candidate)
    return result
