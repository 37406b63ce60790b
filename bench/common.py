"""What every section of the benchmark shares: timing, the scratch cache, batches without end, the table."""

import statistics
import time

import torch

from lean.cache import Cache, build
from lean.pennfudan import PennFudanSource


def median_seconds(work, repeats):
    """Median wall seconds of `work()` over `repeats` timed runs, after one untimed warm-up."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copied(state):
    """A state dict of its own: create_model takes a state's tensors as the model's."""
    return {key: value.detach().clone() for key, value in state.items()}


def epochs(make_batches):
    """Batches without end: epoch after epoch of make_batches(epoch)."""
    epoch = 0
    while True:
        yield from make_batches(epoch)
        epoch += 1


def time_steps(step, batches, count, sync):
    """(seconds waiting for each batch, seconds of each whole step: the wait, the step, the device finishing)."""
    waits, totals = [], []
    for _ in range(count):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        step(batch)
        sync()
        waits.append(fetched - start)
        totals.append(time.perf_counter() - start)
    batches.close()  # a Loader's background thread stops here
    return waits, totals


def loader_epoch(loader, cuda=False):
    """One epoch through the Loader, batches of 2, as the train loop would take them."""

    def work():
        for _images, _targets in loader:
            pass
        if cuda:
            torch.cuda.synchronize()

    return work


def scratch_cache(root, scratch):
    """The benchmark's one cache of the PennFudan folder at `root`, built in `scratch` when first asked for."""
    path = scratch / "pennfudan.h5"
    if not path.exists():
        build(PennFudanSource(root), path, progress=False)
    return Cache(path)


def print_header(header):
    print(header)
    print("| section | measure | seed pipeline | seed | lean | lean vs seed |")
    print("|---|---|---|---|---|---|", flush=True)


def print_row(section, measure, baseline, seed, lean, ratio):
    ratio_text = "-" if ratio != ratio else f"{ratio:.2f}x"
    seed_text = "-" if baseline == "-" else f"{seed:.3g}"
    print(f"| {section} | {measure} | {baseline} | {seed_text} | {lean:.3g} | {ratio_text} |", flush=True)
