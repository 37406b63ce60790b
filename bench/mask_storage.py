"""python -m bench.mask_storage CACHE: what a cache's masks take stored as format 1's per-pixel maps, as lean's
cropped bit-packed masks (lean.masks), and as COCO's compressed RLE, and how long each takes to decode a
batch of 2 images into N x H x W uint8 masks."""

import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from lean import masks as mask_codec
from lean.cache import Cache
from lean.cli import Parser, run


def per_batch_ms(decode, count, repeats=5):
    """Median milliseconds per batch of 2 of decode(i) over every image."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            decode(i)
        times.append((time.perf_counter() - start) / count * 2 * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = Parser(prog="python -m bench.mask_storage", description=__doc__)
    parser.add_argument("cache", type=Path)
    cache = Cache(parser.parse_args(argv).cache)
    count, instances = len(cache), len(cache.instances["labels"])
    maps = int((cache.sizes[:, 0] * cache.sizes[:, 1]).sum())
    packed = int(cache.mask_offsets[-1])
    rles = [[mask_util.encode(np.asfortranarray(mask))["counts"] for mask in cache.masks(i)] for i in range(count)]
    rle = sum(len(counts) for image in rles for counts in image)

    def from_rle(i):
        height, width = (int(side) for side in cache.sizes[i])
        objects = [{"size": [height, width], "counts": counts} for counts in rles[i]]
        return np.ascontiguousarray(mask_util.decode(objects).transpose(2, 0, 1)) if objects else None

    parts = [cache.mask_parts(i) for i in range(count)]
    sizes = [tuple(int(side) for side in cache.sizes[i]) for i in range(count)]
    packed_ms = per_batch_ms(lambda i: mask_codec.decode(*parts[i], *sizes[i]), count)
    rle_ms = per_batch_ms(from_rle, count)
    print(f"{count} images, {instances} instances, {maps} pixels")
    print("| storage | MB | per instance, B | decode a batch of 2, ms |")
    print("|---|---|---|---|")
    print(f"| per-pixel instance maps (format 1) | {maps / 1e6:.2f} | - | - |")
    for name, size, ms in (("cropped, bit-packed (format 2)", packed, packed_ms), ("COCO compressed RLE", rle, rle_ms)):
        print(f"| {name} | {size / 1e6:.2f} (1/{maps / size:.0f}) | {size / instances:.0f} | {ms:.2f} |")


if __name__ == "__main__":
    run(main)
