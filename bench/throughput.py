"""python -m bench.throughput: lean against the tutorial's own pipeline, measured side by side in one run.

Every lean figure is printed beside the seed figure measured in the same
process on the same files, with the ratio. Medians over --repeats passes,
after one warm-up pass so both sides read from a warm page cache.
"""

import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.seed_pipeline import seed_loader
from lean.cache import Cache, build
from lean.cli import Parser, run
from lean.loader import Loader
from lean.sources import PennFudanSource, default_root


def median_seconds(work, repeats):
    """Median wall seconds of `work()` over `repeats` timed runs, after one untimed warm-up."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_epoch(root, workers):
    def work():
        for _images, _targets in seed_loader(root, batch_size=2, workers=workers):
            pass

    return work


def cache_epoch(cache, batch_size=2):
    """Batches of 2 as tensors: uint8 images and the tutorial's targets, masks included, built on the CPU."""

    def work():
        for start in range(0, len(cache), batch_size):
            batch = range(start, min(start + batch_size, len(cache)))
            _images = [torch.from_numpy(np.array(cache.image(i))) for i in batch]
            _targets = [cache.target(i) for i in batch]

    return work


def loader_epoch(loader, cuda=False):
    """One epoch through the Loader, batches of 2, as the train loop would take them."""

    def work():
        for _images, _targets in loader:
            pass
        if cuda:
            torch.cuda.synchronize()

    return work


def decode_only(source):
    """The floor the build is measured against: one process decoding every PNG and nothing else."""

    def work():
        for _, image_path, mask_path in source._pairs:
            np.asarray(Image.open(image_path).convert("RGB"))
            np.asarray(Image.open(mask_path))

    return work


def data_section(root, repeats, scratch):
    rows = []
    source = PennFudanSource(root)
    count = len(source)
    cache_path = scratch / "pennfudan.h5"
    build_s = median_seconds(lambda: build(source, cache_path, progress=False), repeats)
    decode_s = median_seconds(decode_only(source), repeats)
    rows.append(("data", f"cache build, {count} images, seconds (ratio: x faster)", "one process decoding the PNGs", decode_s, build_s, decode_s / build_s))

    seed_rates = {workers: count / median_seconds(seed_epoch(root, workers), repeats) for workers in (0, 2)}
    best = max(seed_rates, key=seed_rates.get)
    seed_rate = seed_rates[best]
    baseline = f"Dataset + DataLoader, {best} workers (other: {seed_rates[2 - best]:.3g}/s)"
    cache = Cache(cache_path)
    lean_rates = {"Cache.image + Cache.target, images/s": count / median_seconds(cache_epoch(cache), repeats)}
    for dtype, use in ((torch.uint8, "uint8, as lean.train takes them"), (torch.float32, "float32, for stock torchvision")):
        loader = Loader(cache, batch_size=2, device="cpu", dtype=dtype)
        lean_rates[f"Loader on CPU, {use}, images/s"] = count / median_seconds(loader_epoch(loader), repeats)
    if torch.cuda.is_available():
        loader = Loader(cache, batch_size=2, device="cuda")
        lean_rates["Loader on CUDA, float32, images/s"] = count / median_seconds(loader_epoch(loader, cuda=True), repeats)
    for measure, rate in lean_rates.items():
        rows.append(("data", measure, baseline, seed_rate, rate, rate / seed_rate))
    return rows


def print_table(rows, header):
    print(header)
    print(f"| section | measure | seed pipeline | seed | lean | lean vs seed |")
    print(f"|---|---|---|---|---|---|")
    for section, measure, baseline, seed, lean, ratio in rows:
        print(f"| {section} | {measure} | {baseline} | {seed:.3g} | {lean:.3g} | {ratio:.1f}x |")


def parse_args(argv):
    parser = Parser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    parser.add_argument("--sections", nargs="+", choices=["data"], default=["data"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    root = default_root(args.root)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lean-bench-") as scratch:
        if "data" in args.sections:
            rows += data_section(root, args.repeats, Path(scratch))
    print_table(rows, f"{machine}; {date}; medians of {args.repeats}")
    if args.json:
        fields = ("section", "measure", "seed_pipeline", "seed", "lean", "ratio")
        args.json.write_text(json.dumps({"machine": machine, "date": date, "rows": [dict(zip(fields, row)) for row in rows]}, indent=1))


if __name__ == "__main__":
    run(main)
