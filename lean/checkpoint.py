"""Checkpoints: written whole or not at all, read without unpickling code."""

import os
import shutil

import torch

from lean.errors import LeanError


def save_checkpoint(path, state):
    """torch.save to a temporary name, then rename: a crash mid-write never replaces a good checkpoint."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def copy_atomically(source, target):
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or tampered files alike
        raise LeanError(f"{path}: not a loadable checkpoint ({str(error).splitlines()[0]})") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
