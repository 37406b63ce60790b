"""The data section: lean's cache and Loader against the tutorial's Dataset and DataLoader on Penn-Fudan."""

import numpy as np
import torch
from PIL import Image

from bench.common import loader_epoch, median_seconds, scratch_cache
from bench.seed_pipeline import seed_loader
from lean.cache import build
from lean.loader import Loader
from lean.pennfudan import PennFudanSource


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


def decode_only(source):
    """The floor the build is measured against: one process decoding every PNG and nothing else."""

    def work():
        for _, image_path, mask_path in source.pairs:
            np.asarray(Image.open(image_path).convert("RGB"))
            np.asarray(Image.open(mask_path))

    return work


def data_section(root, repeats, scratch):
    rows = []
    source = PennFudanSource(root)
    count = len(source)
    cache_path = scratch / "pennfudan.h5"  # scratch_cache's: the timed builds leave it for the other sections
    build_s = median_seconds(lambda: build(source, cache_path, progress=False), repeats)
    decode_s = median_seconds(decode_only(source), repeats)
    rows.append(
        (
            "data",
            f"cache build, {count} images, seconds (ratio: x faster)",
            "one process decoding the PNGs",
            decode_s,
            build_s,
            decode_s / build_s,
        )
    )

    seed_rates = {workers: count / median_seconds(seed_epoch(root, workers), repeats) for workers in (0, 2)}
    best = max(seed_rates, key=seed_rates.get)
    seed_rate = seed_rates[best]
    baseline = f"Dataset + DataLoader, {best} workers (other: {seed_rates[2 - best]:.3g}/s)"
    cache = scratch_cache(root, scratch)
    lean_rates = {"Cache.image + Cache.target, images/s": count / median_seconds(cache_epoch(cache), repeats)}
    for dtype, use in (
        (torch.uint8, "uint8, as lean.train takes them"),
        (torch.float32, "float32, for stock torchvision"),
    ):
        loader = Loader(cache, batch_size=2, device="cpu", dtype=dtype)
        lean_rates[f"Loader on CPU, {use}, images/s"] = count / median_seconds(loader_epoch(loader), repeats)
    boxes_only = Loader(cache, batch_size=2, device="cpu", dtype=torch.uint8, masks=False)
    lean_rates["Loader on CPU, uint8, boxes alone (a --task detect run), images/s"] = count / median_seconds(
        loader_epoch(boxes_only), repeats
    )
    if torch.cuda.is_available():
        for masks, what in ((True, "float32"), (False, "float32, boxes alone")):
            loader = Loader(cache, batch_size=2, device="cuda", masks=masks)
            lean_rates[f"Loader on CUDA, {what}, images/s"] = count / median_seconds(
                loader_epoch(loader, cuda=True), repeats
            )
    for measure, rate in lean_rates.items():
        rows.append(("data", measure, baseline, seed_rate, rate, rate / seed_rate))
    if torch.cuda.is_available():
        rows.append(copy_rates(cache, repeats))
    return rows


def copy_rates(cache, repeats):
    """Host-to-device GB/s for the bytes of the largest batch: from pinned memory, as the Loader copies, and from
    pageable memory, as `.to(device)` copies a DataLoader's batch."""
    pixels = np.sort(cache.sizes[:, 0] * cache.sizes[:, 1])[-2:].sum()
    nbytes = int(pixels) * 4  # RGB and the instance map, one byte each
    pageable = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    rates = {
        pinned: nbytes / median_seconds(copy_to_cuda(pageable, pinned), max(repeats, 20)) / 1e9
        for pinned in (False, True)
    }
    return (
        "data",
        f"host-to-device copy of the largest batch ({nbytes / 2**20:.1f} MiB), GB/s, pinned",
        "pageable memory",
        rates[False],
        rates[True],
        rates[True] / rates[False],
    )


def copy_to_cuda(host, pinned):
    if pinned:
        host = host.pin_memory()

    def work():
        host.to("cuda", non_blocking=pinned)
        torch.cuda.synchronize()

    return work
