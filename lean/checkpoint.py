"""What a training run saves, in one place: written whole or not at all, read without unpickling code.

A checkpoint is one torch.save'd dict:

    format, version                       "lean-checkpoint", 2
    model, optimizer, scheduler, scaler   state dicts; with --ema, model is the weights' average
    ema                                   with --ema: {"trained": the weights training goes on from,
                                          "updates": how many steps the average has taken in}
    rng                                   the torch (and CUDA) generator states
    epoch, batch, iteration               where the run resumes (Position)
    best_ap                               the best main AP so far (segm for a Mask R-CNN, bbox for a
                                          Faster R-CNN), -1 before any (best_segm_ap before 2026-11-29)
    evaluations_since_best                how many evaluations since best_ap was reached (--patience
                                          counts them; absent before 2026-12-05: 0)
    cache_fingerprint, world_size         what the run trains on and in how many processes: a resume
                                          must match both (absent from checkpoints before 2026-11-29)
    model_spec                            how to build the model again (lean.model.ModelSpec)
    config                                the run's settings (lean.config.TrainConfig)

The model spec is kept apart from the run's settings, so that evaluation and prediction build the
model from it alone. Checkpoints of version 1 (no format mark, the command line's arguments as
"args") still load: their spec is read off those arguments, here and nowhere else.
"""

import dataclasses
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lean import weights
from lean.background import snapshot
from lean.config import SettingError, TrainConfig, check_types
from lean.errors import LeanError, reason
from lean.files import write_atomically
from lean.model import ModelSpec, create_model

FORMAT = "lean-checkpoint"
VERSION = 2


@dataclass(frozen=True)
class Position:
    """Where a run resumes: the first batch of `epoch` not yet trained on, after `iteration` steps in all."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0


def position_after(iteration, iterations_per_epoch):
    """Where a run that has taken `iteration` steps resumes: the next batch of its epoch, or the next epoch
    when the last one ended."""
    return Position(iteration // iterations_per_epoch, iteration % iterations_per_epoch, iteration)


class RunFolder:
    """A run's output folder, held while the run writes to it: created if missing, locked so that a second run
    on it is refused in one line naming the first, and cleared of the temporary files a killed run left.
    Only the main process of a torchrun holds it; the others write nothing."""

    def __init__(self, path, main=True):
        self.path, self.main, self.lock = Path(path), main, None

    def __enter__(self):
        if not self.main:
            return self.path
        if self.path.exists() and not self.path.is_dir():
            raise LeanError(f"--out {self.path}: is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a+")  # held until __exit__
        except OSError as error:
            raise LeanError(f"--out {self.path}: cannot write there ({error.strerror or error})") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.seek(0)
            other = self.lock.read().strip() or "another process"
            self.lock.close()
            raise LeanError(f"--out {self.path}: another lean.train run is writing there (process {other})") from None
        self.lock.truncate(0)
        self.lock.write(str(os.getpid()))
        self.lock.flush()
        for stale in self.path.glob(".*.tmp"):  # only a run holding the lock writes these: a killed run's
            stale.unlink(missing_ok=True)
        return self.path

    def __exit__(self, *_):
        if self.lock:
            self.lock.close()  # and with it the lock
            self.lock = None


class Checkpointer:
    """Keeps a run's checkpoints in `folder`: last.pt, written after every epoch and on a stop, and best.pt,
    a copy of the one with the best main AP. Disabled (every process under torchrun but the main one), it
    writes nothing but resumes all the same. With a `writer` (lean.background.Writer), the files are written
    in its thread from a snapshot taken at save(), each write joined before the next."""

    def __init__(self, folder, run, spec, config, fingerprint, world_size=1, enabled=True, writer=None):
        self.last, self.best = Path(folder) / "last.pt", Path(folder) / "best.pt"
        self.run, self.spec, self.config, self.enabled, self.writer = run, spec, config, enabled, writer
        self.fingerprint, self.world_size = fingerprint, world_size
        self.best_ap = -1.0
        self.since_best = 0  # evaluations scored since best_ap: what --patience counts

    def resume(self):
        """Load last.pt into the run and the RNG; returns where the run resumes. A run is continued only as it
        ran: on the cache it trained on, in as many processes (the batches of each depend on both)."""
        state = load(self.last)
        trained_on = state.get("cache_fingerprint", self.fingerprint)
        if trained_on != self.fingerprint:
            raise LeanError(f"--resume: {self.config.cache} is not the cache {self.last} trained on (fingerprint "
                            f"{self.fingerprint[:12]}, the run's {trained_on[:12]}: rebuilt since?); train afresh "
                            "with another --out")  # fmt: skip
        processes = state.get("world_size", self.world_size)
        if processes != self.world_size:
            raise LeanError(f"--resume: {self.last} was trained by {processes} process(es), not {self.world_size}; "
                            f"resume it as it ran (torchrun --nproc_per_node={processes})")  # fmt: skip
        ema = self.run.ema
        self.run.model.load_state_dict(state["ema"]["trained"] if ema is not None else state["model"])
        if ema is not None:
            ema.load(state["model"], state["ema"]["updates"])
        self.run.optimizer.load_state_dict(state["optimizer"])
        self.run.scheduler.load_state_dict(state["scheduler"])
        self.run.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.best_ap = state["best_ap"] if "best_ap" in state else state["best_segm_ap"]
        self.since_best = state.get("evaluations_since_best", 0)
        return Position(state["epoch"], state["batch"], state["iteration"])

    def save(self, position, ap=None, awaiting=None):
        """Write last.pt at `position`, atomically; copy it to best.pt when `ap` (the run's main AP) beats every
        earlier one. With `awaiting` (an epoch whose AP is still being worked out), keep this last.pt aside
        for `scored`. A failed write (a full disk) leaves the last good checkpoint and no temporary file."""
        improved = ap is not None and self._count(ap)
        if not self.enabled:
            return
        trained, ema = self.run.model.state_dict(), self.run.ema
        state = {
            "format": FORMAT,
            "version": VERSION,
            "model": trained if ema is None else ema.averaged(trained),
            "optimizer": self.run.optimizer.state_dict(),
            "scheduler": self.run.scheduler.state_dict(),
            "scaler": self.run.scaler.state_dict(),
            "rng": _rng_state(),
            **dataclasses.asdict(position),
            "best_ap": self.best_ap,
            "evaluations_since_best": self.since_best,
            "cache_fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "model_spec": {
                **dataclasses.asdict(self.spec),
                "class_names": list(self.spec.class_names),
                "category_ids": list(self.spec.category_ids),
            },
            "config": self.config.to_dict(),
        }
        if ema is not None:
            state["ema"] = {"trained": trained, "updates": ema.updates}

        def write(state):
            write_atomically(self.last, lambda temporary: torch.save(state, temporary))
            if improved:
                write_atomically(self.best, lambda temporary: shutil.copyfile(self.last, temporary))
            if awaiting is not None:  # a second name for this file, kept when last.pt is replaced
                self._kept(awaiting).unlink(missing_ok=True)
                os.link(self.last, self._kept(awaiting))

        if self.writer is None:
            write(state)
        else:
            self.writer.wait()
            state = snapshot(state)
            self.writer.submit(lambda: write(state))

    def scored(self, epoch, ap):
        """The main AP of `epoch`, whose checkpoint was saved awaiting it: that checkpoint becomes best.pt if
        the AP beats every earlier one."""
        if self.writer is not None:
            self.writer.wait()
        kept = self._kept(epoch)
        if self._count(ap):
            if self.enabled:
                os.replace(kept, self.best)
        elif self.enabled:
            kept.unlink(missing_ok=True)

    def _count(self, ap):
        """Take in an evaluation's main AP; returns whether it is the best yet."""
        improved = ap > self.best_ap
        self.best_ap, self.since_best = (ap, 0) if improved else (self.best_ap, self.since_best + 1)
        return improved

    def _kept(self, epoch):
        return self.last.with_name(f".epoch-{epoch}.awaiting-score.tmp")  # a run's start clears what a kill left


def load(path):
    """The checkpoint dict at `path`, or one line saying why it is not one."""
    state = weights.load(path, "checkpoint")
    if not is_checkpoint(state):
        raise LeanError(f"{path}: not a lean checkpoint (no model and settings inside)")
    _check_readable(state, path)
    return state


def is_checkpoint(state):
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and ("config" in state or "args" in state)


def _check_readable(state, path):
    """One line naming `path` where a checkpoint comes from a newer lean, or its model spec or settings cannot
    be read back: every command that loads one builds them from it."""
    version = state.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise LeanError(f"{path}: a checkpoint of version {version!r}; this lean reads versions 1 to {VERSION}")
    try:
        spec = model_spec(state)
        check_types(spec)
        run_config(state)
    except KeyError as error:
        raise LeanError(f"{path}: its model spec or settings cannot be read back (no {error.args[0]!r})") from None
    except SettingError as error:
        raise LeanError(f"{path}: its {error.field} {error.problem}") from None
    except (TypeError, ValueError, LeanError) as error:
        raise LeanError(f"{path}: its model spec or settings cannot be read back ({reason(error)})") from None


def model_spec(state):
    """The ModelSpec of a checkpoint dict; for version 1, read off the arguments it was saved with."""
    if "model_spec" in state:
        return ModelSpec(**state["model_spec"])
    args = state["args"]
    return ModelSpec(
        args["backbone"], ("person",), args["min_size"], args["max_size"], pretrained=args.get("weights") != "none"
    )


def run_config(state):
    """The TrainConfig a checkpoint dict was saved with."""
    return TrainConfig.from_dict(state["config"] if "config" in state else state["args"])


# What a resumed run may change: how long it runs, how it logs and evaluates, and how fast it runs; not what
# it learns from or how.
RESUMABLE = (
    "epochs", "max_iters", "log_every", "eval_every", "no_eval", "device", "amp", "channels_last", "compile",
    "canvas_levels", "batched_heads", "patience", "tensorboard",
)  # fmt: skip


def resumed_config(path, given):
    """The settings of a run resumed from the checkpoint at `path`: the checkpoint's, with those of the flags
    `given` ({field: value}) that are RESUMABLE. A flag given with another value for anything else is refused,
    in one line naming it."""
    saved = run_config(load(path))
    for field, value in given.items():
        if field not in (*RESUMABLE, "out", "resume") and value != getattr(saved, field):
            flag, keep = "--" + field.replace("_", "-"), ", ".join("--" + f.replace("_", "-") for f in RESUMABLE)
            raise LeanError(f"--resume: {flag} {value} differs from the run's {getattr(saved, field)}; a resumed run "
                            f"keeps its settings, but for {keep}")  # fmt: skip
    kept = {field: value for field, value in given.items() if field in RESUMABLE}
    return dataclasses.replace(saved, **kept, out=given["out"], resume=True)


def load_model(path, device):
    """(model on `device` with the checkpoint's weights, its ModelSpec, its TrainConfig), built from the spec alone."""
    state = load(path)
    spec = model_spec(state)
    return create_model(spec, state["model"], device=device), spec, run_config(state)


def read_weights(path):
    """(state dict, pretrained) from a weights file: a plain state dict is pretrained weights; a lean
    checkpoint's model comes in its own layout."""
    loaded = weights.load(path, "weights file")
    if not isinstance(loaded, dict):
        raise LeanError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if is_checkpoint(loaded):
        _check_readable(loaded, path)
        return loaded["model"], model_spec(loaded).pretrained
    return loaded, True


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
