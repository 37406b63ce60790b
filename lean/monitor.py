"""Watching a run: the Monitor works out each window's figures from the losses, the TrainingLog writes them.

Losses stay on the device until a window closes (every --log-every iterations, and at an epoch's end),
so a CUDA step never waits for the host to read them; on the CPU there is nothing to wait for, and
every step is checked at once. A non-finite loss raises NonFiniteLoss naming the iteration and each
loss, as detectron2's trainer does.
"""

import contextlib
import json
import os
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from lean import distributed
from lean.errors import LeanError, reason
from lean.internals import compile_seconds, graphs_compiled


class NonFiniteLoss(Exception):
    pass


def process_age():
    """Seconds since this process started (from Linux's /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after the command's name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


class StartUp:
    """Where a run's start-up goes: the imports (from process start), then each part marked, to the first step."""

    def __init__(self):
        self.parts = {"imports": process_age()}
        self.since = time.perf_counter()

    def mark(self, part):
        now = time.perf_counter()
        self.parts[part], self.since = now - self.since, now

    def __str__(self):
        known = {part: seconds for part, seconds in self.parts.items() if seconds is not None}
        parts = ", ".join(f"{part} {seconds:.1f}" for part, seconds in known.items())
        return f"start-up: {sum(known.values()):.1f} s to the first step ({parts})"


class Window:
    """Recent values (median over the window) and the running mean of every value, like the tutorial's log."""

    def __init__(self, size=20):
        self.recent, self.total, self.count = deque(maxlen=size), 0.0, 0

    def add(self, value):
        self.recent.append(value)
        self.total += value
        self.count += 1

    def __str__(self):
        return f"{statistics.median(self.recent):.4f} ({self.total / self.count:.4f})"


@dataclass
class WindowFigures:
    """One window of a run: each iteration's losses (`names`: "loss", the sum, then each part) and the pace."""

    epoch: int
    batch: int  # batches of the epoch done
    batches: int  # in the epoch
    iterations: list
    names: list
    rows: list
    windows: dict = field(repr=False)
    lr: float = 0.0
    images_per_second: float = 0.0
    eta_seconds: float = 0.0
    data_wait_s: float = 0.0
    window_s: float = 0.0
    peak_memory_mb: float | None = None
    graphs_compiled: int = 0
    compile_s: float = 0.0


def check_finite(iterations, values, names):
    """Raise NonFiniteLoss for the first row of `values` (the sum, then each of `names`) that is not finite."""
    for iteration, row in zip(iterations, values):
        if not torch.isfinite(row).all():
            parts = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, row[1:].tolist()))
            raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {parts}")


class Monitor:
    """Collects each step's losses and, when a window closes, reads them (one host sync) and works out the
    window's figures: median and mean of every loss, images/s, time waiting for data, ETA."""

    def __init__(self, loader, optimizer, process, log_every, total_iterations, start_iteration=0):
        self.loader, self.optimizer, self.process = loader, optimizer, process
        self.log_every, self.total_iterations = log_every, total_iterations
        self.started, self.start_iteration = (
            time.perf_counter(),
            start_iteration,
        )  # a resumed run's ETA counts its own pace
        self.pending = []  # (iteration, losses on the device) not read yet
        self.new_epoch()

    def new_epoch(self):
        self.windows = defaultdict(Window)
        self.window_started, self.wait_before = time.perf_counter(), self.loader.wait_seconds

    def add(self, epoch, batch_index, iteration, losses, names):
        """Take one step's losses (the sum, then each of `names`); returns the figures of a window it closed."""
        self.pending.append((iteration, losses))
        last_of_epoch = batch_index + 1 == len(self.loader)
        if iteration == 1 or iteration % self.log_every == 0 or iteration >= self.total_iterations or last_of_epoch:
            return self.flush(epoch, batch_index, names)
        if self.loader.device.type == "cpu":
            check_finite([iteration], losses.view(1, -1), names)
        return None

    def flush(self, epoch, batch_index, names):
        """Close the window: the figures of the steps taken since the last one, or None if there were none."""
        if not self.pending:
            return None
        values = torch.stack([losses for _, losses in self.pending]).cpu()  # the one host sync per window
        iterations = [iteration for iteration, _ in self.pending]
        check_finite(iterations, values, names)
        if self.process.distributed:
            values = distributed.mean_over_processes(values.to(self.loader.device), self.process).cpu()
        self.pending = []
        names = ["loss", *names]
        rows = values.tolist()
        for row in rows:
            for name, value in zip(names, row):
                self.windows[name].add(value)
        figures = self._figures(epoch, batch_index, iterations, names, rows)
        self.window_started, self.wait_before = time.perf_counter(), self.loader.wait_seconds
        return figures

    def _figures(self, epoch, batch_index, iterations, names, rows):
        now = time.perf_counter()
        elapsed = now - self.window_started
        done_here = iterations[-1] - self.start_iteration
        cuda = self.loader.device.type == "cuda"
        return WindowFigures(
            epoch=epoch,
            batch=batch_index + 1,
            batches=len(self.loader),
            iterations=iterations,
            names=names,
            rows=rows,
            windows=self.windows,
            lr=self.optimizer.param_groups[0]["lr"],
            images_per_second=len(rows) * self.loader.batch_size * self.process.world_size / max(elapsed, 1e-9),
            eta_seconds=(now - self.started) / done_here * (self.total_iterations - iterations[-1]),
            data_wait_s=self.loader.wait_seconds - self.wait_before,
            window_s=elapsed,
            peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            graphs_compiled=graphs_compiled(),
            compile_s=compile_seconds(),
        )


class TrainingLog:
    """Writes a run's figures: a console line per window, and every figure to metrics.jsonl (when given a
    path), added to a resumed run's, begun afresh for a new one, and to a `board` if given. Disabled, it
    writes nothing: under torchrun only the main process writes."""

    def __init__(self, metrics_path=None, enabled=True, resumed=False, board=None):
        self.enabled, self.path, self.metrics = enabled, metrics_path, None
        self.board = board if enabled else None  # lean.board.Board: every record, as TensorBoard scalars too
        if metrics_path and enabled:
            self.metrics = self._guarded(lambda: metrics_path.open("a" if resumed else "w"))
            if resumed and self.metrics.tell() > 0 and _last_byte(metrics_path) != b"\n":
                self._write("\n")  # a killed run's half line stays half a line: the next record starts afresh

    def _guarded(self, action):
        """`action()`, a full disk or any other failure to write the log one line: the run stops there, its last
        checkpoint kept."""
        try:
            return action()
        except OSError as error:
            self.metrics = None  # nothing more is written, nor flushed at close
            raise LeanError(f"{self.path}: cannot write ({error.strerror or reason(error)}); the run stops here, "
                            "its last checkpoint kept: continue it with --resume") from None  # fmt: skip

    def _write(self, text):
        def write():
            self.metrics.write(text)
            self.metrics.flush()

        self._guarded(write)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def close(self):
        if self.board:
            self.board.close()
        if self.metrics:
            metrics, self.metrics = self.metrics, None
            with contextlib.suppress(OSError):  # whatever failed was said when it failed
                metrics.close()

    def print(self, message):
        if self.enabled and message:
            print(message, flush=True)

    def window(self, figures):
        if not self.enabled or figures is None:
            return
        losses = "  ".join(f"{name}: {window}" for name, window in figures.windows.items())
        width = len(str(figures.batches))
        memory = f"  max mem: {figures.peak_memory_mb:.0f}MB" if figures.peak_memory_mb is not None else ""
        self.print(
            f"Epoch: [{figures.epoch}]  [{figures.batch:>{width}}/{figures.batches}]  "
            f"eta: {timedelta(seconds=round(figures.eta_seconds))}  lr: {figures.lr:.6f}  {losses}  "
            f"images/s: {figures.images_per_second:.2f}  data: {figures.data_wait_s:.3f}s  "
            f"graphs: {figures.graphs_compiled} ({figures.compile_s:.0f} s compiling){memory}"
        )
        for iteration, row in zip(figures.iterations, figures.rows):
            self.record({"epoch": figures.epoch, "iteration": iteration, **dict(zip(figures.names, row))})
        self.record({
            "epoch": figures.epoch, "iteration": figures.iterations[-1], "lr": figures.lr,
            "images_per_second": figures.images_per_second, "data_wait_s": figures.data_wait_s,
            "window_s": figures.window_s, "graphs_compiled": figures.graphs_compiled, "compile_s": figures.compile_s,
        })  # fmt: skip

    def evaluation(self, epoch, report):
        self.record({"epoch": epoch, **{kind: values["stats"] for kind, values in report.items()}})
        self.record({"epoch": epoch, "per_class": {kind: values["per_class"] for kind, values in report.items()}})

    def record(self, entry):
        if self.metrics:
            self._write(json.dumps(entry) + "\n")
        if self.board:
            self.board.add(entry)


def _last_byte(path):
    with open(path, "rb") as file:
        file.seek(-1, 2)
        return file.read(1)
