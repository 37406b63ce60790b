"""The coco section: COCO-format photos through the references' data path and through lean's Loader, raw and
encoded, beside the floor under any loader of raw pixels; and what the caches take on disk."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench.common import loader_epoch, median_seconds
from lean.cache import Cache, build
from lean.loader import Loader


def memory_floor(cache, workers):
    """The least any loader of a raw cache does, lean's included: each image's pixels copied out of the cache and
    its N x H x W masks zeroed (nothing unpacked, pasted or flipped), in the Loader's batches of 2, on `workers`
    threads: what the tutorial's target format costs in memory traffic alone."""
    batches = Loader(cache, batch_size=2, device="cpu").batches()
    instances = np.diff(cache.instance_offsets)
    pixels, _ = cache.tensors()

    def batch(indices):
        made = []
        for i in indices:
            height, width = (int(side) for side in cache.sizes[i])
            span = slice(3 * int(cache.pixel_offsets[i]), 3 * int(cache.pixel_offsets[i + 1]))
            made.append((pixels[span].clone(), np.zeros((int(instances[i]), height, width), dtype=np.uint8)))
        return made

    def work():
        if workers == 1:
            for indices in batches:
                batch(indices)
            return
        with ThreadPoolExecutor(workers) as pool:
            for _made in pool.map(batch, batches):
                pass

    return work


def coco_section(repeats, scratch, count):
    """COCO-format photos (bench.coco_data): the references' COCO data path against lean's Loader on raw and on
    encoded pixels, batches of 2, uint8 images; and what the caches take on disk."""
    from bench.coco_data import generate
    from bench.seed_pipeline import references_coco_loader
    from lean.coco import CocoSource

    annotations = generate(scratch / "coco", count)
    source = CocoSource(annotations)
    rows, caches = [], {}
    for pixels in ("raw", "encoded"):
        path = scratch / f"coco-{pixels}.h5"
        build_s = median_seconds(lambda path=path, pixels=pixels: build(source, path, progress=False, pixels=pixels), 1)
        caches[pixels] = Cache(path)
        rows.append(("coco", f"cache build, {count} photos, {pixels} pixels, seconds", "-", 0.0, build_s, float("nan")))
    references = count / median_seconds(seed_epoch_of(references_coco_loader(annotations, annotations.parent)), repeats)
    baseline = "references' CocoDetection + polygon masks, DataLoader, 2 workers"
    for pixels, cache in caches.items():
        rate = count / median_seconds(
            loader_epoch(Loader(cache, batch_size=2, device="cpu", dtype=torch.uint8)), repeats
        )
        rows.append(
            ("coco", f"Loader on CPU, {pixels} pixels, uint8, images/s", baseline, references, rate, rate / references)
        )
    for workers in (1, 2):
        rate = count / median_seconds(memory_floor(caches["raw"], workers), repeats)
        measure = f"floor: raw pixels copied, masks zeroed, nothing else, {workers} thread(s), images/s"
        rows.append(("coco", measure, baseline, references, rate, rate / references))
    if torch.cuda.is_available():
        for device_decode, how in ((False, "decoded on the CPU"), (True, "JPEGs decoded by nvJPEG")):
            loader = Loader(
                caches["encoded"], batch_size=2, device="cuda", dtype=torch.uint8, device_decode=device_decode
            )
            rate = count / median_seconds(loader_epoch(loader, cuda=True), repeats)
            measure = f"Loader on CUDA, encoded pixels {how}, uint8, images/s"
            rows.append(("coco", measure, baseline, references, rate, rate / references))
    jpegs = sum(image["path"].stat().st_size for image in source.images)
    masks = int(caches["encoded"].mask_offsets[-1])
    encoded = os.path.getsize(scratch / "coco-encoded.h5")
    files = jpegs + masks
    rows.append(("coco", "encoded cache, MB (ratio: cache / files)", "the JPEG files + lean's masks", files / 1e6,
                 encoded / 1e6, encoded / files))  # fmt: skip
    maps = int((caches["raw"].sizes[:, 0] * caches["raw"].sizes[:, 1]).sum())
    rows.append(("coco", "masks, MB (ratio: maps / masks)", "per-pixel instance maps (format 1)", maps / 1e6,
                 masks / 1e6, maps / masks))  # fmt: skip
    return rows


def seed_epoch_of(loader):
    def work():
        for _batch in loader:
            pass

    return work
