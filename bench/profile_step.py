"""python -m bench.profile_step: where the time of lean.train's step goes, operator by operator.

Runs the benchmark's lean step (resnet50_fpn, batch 2, lean's speed settings, Penn-Fudan) for --warmup
steps, then profiles --steps more and prints the operators that took longest: on CUDA by device time,
with the share of wall time its kernels ran and how often the host waited for the device (each wait
leaves the GPU idle until the host has launched the next kernels); on the CPU by CPU time.
"""

import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.throughput import lean_training, scratch_cache
from lean.cli import Parser, run
from lean.sources import default_root

HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")  # cudaMemcpy: blocking


def parse_args(argv):
    parser = Parser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--compile", action="store_true", help="with the compiled backbone (lean.train --compile)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="lean-profile-") as scratch:
        cache = scratch_cache(default_root(args.root), Path(scratch))
        step, batches = lean_training(cache, device, args.min_size, args.max_size, args.compile)
        for _ in range(args.warmup):
            step(next(batches))
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as profiled:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(next(batches))
            sync()
            wall_us = (time.perf_counter() - start) * 1e6
        batches.close()
    events = profiled.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=args.rows))
    print(f"{args.steps} steps, {wall_us / args.steps / 1e3:.1f} ms each")
    if cuda:
        busy_us = sum(event.self_device_time_total for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
        waits = sum(event.count for event in events if event.key.startswith(HOST_WAITS))
        print(f"GPU kernels: {100 * busy_us / wall_us:.0f} % of wall time (summed over streams); "
              f"the host waited for the device {waits / args.steps:.0f} times a step")


if __name__ == "__main__":
    run(main)
