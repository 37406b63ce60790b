"""Every weights file lean reads, read with nothing but tensors and plain values unpickled: checkpoints, --weights
files and the published weights torchvision's builders download; each refusal one line.
"""

import os
import pickle
import urllib.error
from pathlib import Path

import torch

from lean.errors import LeanError, reason, refusal

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at every call


def load(path, what):
    """torch.load of the file at `path` with nothing but tensors and plain values unpickled, or one line saying
    why it is not a loadable `what`."""
    path = Path(path)
    if not path.is_file():
        raise LeanError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # foreign or tampered files
        raise LeanError(f"{path}: not a loadable {what} ({refusal(error)})") from None
    except Exception as error:  # truncated files, zip and torch errors alike
        raise LeanError(f"{path}: not a loadable {what} ({reason(error)})") from None


class WeightsUnavailable(LeanError):
    """The published weights could not be downloaded."""


class downloading:
    """While published weights are fetched and loaded. torchvision's builders load them with torch.hub's
    default, weights_only=False, so a weights-only load is forced here, as for every file lean reads; a
    failed download, or a file in torch's cache that holds more than weights, becomes one line."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        self.before = os.environ.get(FORCE_WEIGHTS_ONLY)
        os.environ[FORCE_WEIGHTS_ONLY] = "1"
        return self

    def __exit__(self, kind, error, traceback):
        if self.before is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = self.before
        if isinstance(error, pickle.UnpicklingError):
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsUnavailable(f"{folder}: the {self.what} weights file there {refusal(error)}; delete it "
                                     "to download it again")  # fmt: skip
        if isinstance(error, (urllib.error.URLError, OSError, RuntimeError)) and _is_download_error(error):
            why = getattr(error, "reason", None) or reason(error)
            raise WeightsUnavailable(f"cannot download the {self.what} weights ({why})") from None
        return False


def _is_download_error(error):
    text = str(error).lower()
    return isinstance(error, urllib.error.URLError) or any(
        word in text for word in ("download", "urlopen", "connection", "hash", "name or service", "network")
    )
