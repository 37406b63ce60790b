"""python -m bench.profile_step: where the time of lean.train's step goes, operator by operator.

Runs the benchmark's lean step (resnet50_fpn, lean's speed settings, Penn-Fudan) for --warmup steps,
times --steps more (median, and peak device memory), then profiles as many and prints the operators that
took longest: on CUDA by device time, with the share of wall time its kernels ran and how often the host
waited for the device (each wait leaves the GPU idle until the host has launched the next kernels), and
the source lines that made the host wait, counted by torch.cuda.set_sync_debug_mode; on the CPU by CPU time.
With --count-syncs, the step's host syncs counted on any device by bench.syncs, by operation and by line, on
the path a GPU takes (lean.heads' fixed shapes) whatever the device.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import scratch_cache
from bench.syncs import count_syncs
from bench.train_section import lean_training
from lean.cache import Cache
from lean.cli import Parser, add_device_argument, check_device, run
from lean.pennfudan import default_root
from lean.speed import COMPILE, Speed, configure_process

HOST_WAITS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy ",
)  # cudaMemcpy: blocking


OFFLINE = "pass --root DIR with a PennFudan folder, or --cache with a built cache"


def parse_args(argv):
    parser = Parser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    add_device_argument(parser)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument(
        "--cache", type=Path, help="a built Penn-Fudan cache (default: built from --root in a scratch folder)"
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[2], help="one run each")
    parser.add_argument("--sites", type=int, default=40, help="sync sites to list")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25, help="operators to list (0: none)")
    parser.add_argument(
        "--compile", choices=COMPILE, help="how the backbone runs (default: lean.train's for the device)"
    )
    parser.add_argument(
        "--no-canvases", action="store_true", help="batches padded as torchvision pads them, not to canvases"
    )
    parser.add_argument(
        "--count-syncs", action="store_true", help="count the batched heads' host syncs on any device (bench.syncs)"
    )
    parser.add_argument(
        "--batched-heads", action=argparse.BooleanOptionalAction, help="default: lean.train's for the device"
    )
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    return args


def sync_sites(step, batches, steps):
    """Counter of 'file:line' -> host syncs per step, as torch.cuda.set_sync_debug_mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step(next(batches))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    return {site: count / steps for site, count in sites.most_common()}


def print_counted_syncs(cache, device, args, speed, batch_size):
    """Count the syncs of --steps steps of the GPU's path after one untimed step, with bench.syncs; print them by
    operation and by line and return the count a step."""
    speed = dataclasses.replace(speed, batched_heads=True)
    step, batches = lean_training(
        cache, device, args.min_size, args.max_size, speed, lr=0.0, batch_size=batch_size, fixed_shapes=True
    )
    step(next(batches))
    steps = args.steps
    with count_syncs() as count:
        for _ in range(steps):
            step(next(batches))
    print(f"counted syncs a step: {count.total / steps:.1f}")
    for op, n in count.by_op.most_common():
        print(f"  {n / steps:5.1f} a step  {op}")
    for line, n in count.by_line.most_common(args.sites):
        print(f"  {n / steps:5.1f} a step  {line}")
    batches.close()
    return count.total / steps


def profile_batch_size(cache, device, args, batch_size):
    """Print lean's step at `batch_size`: the operator table (--rows), the sync sites, and a summary line."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    speed = Speed.for_device(device, compile=args.compile, batched_heads=args.batched_heads)
    if args.no_canvases:
        speed = dataclasses.replace(speed, canvases=False)
    step, batches = lean_training(cache, device, args.min_size, args.max_size, speed, lr=0.0, batch_size=batch_size)
    for _ in range(args.warmup):
        step(next(batches))
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(next(batches))
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiled:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(next(batches))
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    sites = sync_sites(step, batches, args.steps) if cuda else {}
    batches.close()
    counted = print_counted_syncs(cache, device, args, speed, batch_size) if args.count_syncs else None
    events = profiled.key_averages()
    if args.rows:
        print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows))
    median = statistics.median(times)
    summary = (
        f"{speed}; batch {batch_size}, {args.min_size}/{args.max_size}: {median * 1e3:.1f} ms a step "
        f"(median of {args.steps}), {batch_size / median:.1f} images/s"
    )
    if cuda:
        busy_us = sum(
            event.self_device_time_total for event in events if event.device_type == torch.autograd.DeviceType.CUDA
        )
        waits = sum(event.count for event in events if event.key.startswith(HOST_WAITS))
        summary += (
            f", peak {peak:.1f} GiB; GPU kernels {100 * busy_us / wall_us:.0f} % of the profiled steps' wall time "
            f"(summed over streams); the host waited for the device {waits / args.steps:.0f} times a step; "
            f"sync_debug_mode counted {sum(sites.values()):.0f} a step"
        )
        for site, count in list(sites.items())[: args.sites]:
            print(f"  {count:5.1f} a step  {site}")
    if counted is not None:
        summary += f"; bench.syncs counted {counted:.0f} a step"
    print(summary, flush=True)


def main(argv=None):
    args = parse_args(argv)
    configure_process()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="lean-profile-") as scratch:
        root = None if args.cache else default_root(args.root, advice=OFFLINE)
        cache = Cache(args.cache) if args.cache else scratch_cache(root, Path(scratch))
        for batch_size in args.batch_size:
            profile_batch_size(cache, device, args, batch_size)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    run(main)
