"""python -m bench.throughput: lean against the tutorial's own pipeline, measured side by side in one run.

Every lean figure is printed beside the seed figure measured in the same
process on the same files, with the ratio. Medians over --repeats passes,
after one warm-up pass so both sides read from a warm page cache.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.seed_pipeline import seed_loader, seed_model, seed_model_from_scratch, seed_step
from lean.cache import Cache, build
from lean.cli import Parser, run
from lean.engine import train_step
from lean.internals import set_recompile_limit
from lean.loader import Loader
from lean.model import ModelSpec, build_model
from lean.optim import make_optimizer, make_scheduler
from lean.sources import PennFudanSource, default_root
from lean.speed import RECOMPILE_LIMIT, Speed, keep_freed_memory, tune_for_speed


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


def decode_only(source):
    """The floor the build is measured against: one process decoding every PNG and nothing else."""

    def work():
        for _, image_path, mask_path in source.pairs:
            np.asarray(Image.open(image_path).convert("RGB"))
            np.asarray(Image.open(mask_path))

    return work


def scratch_cache(root, scratch):
    """The benchmark's one cache of the PennFudan folder at `root`, built in `scratch` when first asked for."""
    path = scratch / "pennfudan.h5"
    if not path.exists():
        build(PennFudanSource(root), path, progress=False)
    return Cache(path)


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
    if torch.cuda.is_available():
        loader = Loader(cache, batch_size=2, device="cuda")
        lean_rates["Loader on CUDA, float32, images/s"] = count / median_seconds(
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


def seed_training(root, device, min_size, max_size):
    """(step, batches, weights): the tutorial's step (torchvision's resnet50_fpn, eager fp32, SGD at lr 0) from
    a fixed random init, its Dataset + DataLoader's batches without end, and the init's weights."""
    torch.manual_seed(0)
    model = seed_model(min_size, max_size).to(device).train()
    weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = make_optimizer(model, 0.0, fused=False)  # the tutorial's SGD, as torch configures it by default

    def step(batch):
        seed_step(model, optimizer, *batch, device)

    return step, epochs(lambda _: seed_loader(root, batch_size=2, workers=2, shuffle=True, train=True)), weights


def lean_training(cache, device, min_size, max_size, speed=None, weights=None, lr=0.005, batch_size=2, fused=None):
    """(step, batches): lean.train's step fine-tuning torchvision's resnet50_fpn from `weights` (a state dict; if
    not given, the seed model's fixed random init) with `speed` (default: lean's for the device), and the
    Loader's batches without end."""
    if weights is None:
        torch.manual_seed(0)
        weights = seed_model(min_size, max_size).state_dict()
    speed = speed or Speed.for_device(device)
    model = build_model(ModelSpec("resnet50_fpn", ("person",), min_size, max_size), weights)  # the fine-tuning layout
    model = tune_for_speed(model.to(device), speed)
    model.train()
    optimizer = make_optimizer(model, lr, fused=fused)
    loader = Loader(cache, batch_size=batch_size, device=device, dtype=torch.uint8)
    scheduler = make_scheduler(optimizer, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=speed.amp == torch.float16)

    def step(batch):
        train_step(model, *batch, optimizer, scheduler, scaler, speed.amp)

    def batches(epoch):
        loader.set_epoch(epoch)
        return loader

    return step, epochs(batches)


def lean_variants(device, inductor):
    """{label: (Speed, fused SGD or None for the default)}: lean's default for the device first, then on
    CUDA the same step with batches padded as torchvision pads them, with foreach SGD, and with the
    backbone replayed as CUDA graphs; with `inductor`, the backbone compiled by inductor."""
    default = Speed.for_device(device)
    variants = {f"lean's default ({default})": (default, None)}
    if device.type == "cuda":
        variants["batches padded as they come"] = (dataclasses.replace(default, canvases=False), None)
        variants["foreach SGD"] = (default, False)
        variants["CUDA graphs (--compile cudagraphs)"] = (dataclasses.replace(default, compile="cudagraphs"), None)
    if inductor:
        variants["inductor"] = (dataclasses.replace(default, compile="inductor", canvases=True), None)
    return variants


def train_section(root, steps, warmup, min_size, max_size, device, inductor, scratch):
    """Steady-state images/s, the tutorial's pipeline (seed data path, eager fp32 Mask R-CNN) against lean.train's
    step in each of lean_variants; yields each row as soon as it is measured.

    Both fine-tune torchvision's resnet50_fpn Mask R-CNN in the layout its COCO weights give it, from the
    same random weights, with SGD at learning rate 0 (a real step's work on weights that stay put, so step
    costs do not drift), batch 2, `warmup` untimed then `steps` timed steps; a step's time runs from asking
    for its batch to the device finishing it. A compiled variant's compile time is the time its steps took
    over their median, warm-up and timed steps together (a new canvas compiles when first met).
    docs/performance.md has the method's reasons.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seed_step, seed_batches, weights = seed_training(root, device, min_size, max_size)
    seed_waits, seed_totals = time_steps(seed_step, seed_batches, warmup + steps, sync)
    seed_rate = 2 / statistics.median(seed_totals[warmup:])
    seed_wait = 100 * sum(seed_waits[warmup:]) / sum(seed_totals[warmup:])
    del seed_step, seed_batches

    cache = scratch_cache(root, scratch)
    for label, (speed, fused) in lean_variants(device, inductor).items():
        lean_step, lean_batches = lean_training(cache, device, min_size, max_size, speed, weights, lr=0.0, fused=fused)
        waits, totals = time_steps(lean_step, lean_batches, warmup + steps, sync)
        median = statistics.median(totals[warmup:])
        rate = 2 / median
        where = f"{device.type}, {min_size}/{max_size} px"
        yield (
            "train",
            f"images/s, median of {steps} steps ({where}; {label})",
            "seed Dataset + eager fp32 Mask R-CNN",
            seed_rate,
            rate,
            rate / seed_rate,
        )
        wait = 100 * sum(waits[warmup:]) / sum(totals[warmup:])
        yield (
            "train",
            f"waiting for data, % of step time ({label})",
            "seed DataLoader, 2 workers",
            seed_wait,
            wait,
            float("nan"),
        )
        if speed.compile != "off":
            compile_s = sum(max(0.0, total - median) for total in totals)
            yield (
                "train",
                f"compile time, seconds: steps' time over their median ({label})",
                "-",
                0.0,
                compile_s,
                float("nan"),
            )
        del lean_step, lean_batches
        if device.type == "cuda":
            torch.cuda.empty_cache()


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


def eval_section(root, repeats, scratch):
    """Seconds to score the 50 test images (bbox + segm) the references' way against lean.evaluate, same predictions."""
    from bench.seed_pipeline import seed_evaluate
    from lean.evaluate import coco_eval
    from lean.loader import split_indices

    cache = scratch_cache(root, scratch)
    _, test = split_indices(len(cache), seed=0)
    rng = np.random.default_rng(0)
    predictions = []  # the ground truth, jittered: the same detections for both sides
    for i in test:
        target = cache.target(i)
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 4, target["boxes"].shape)).float()
        masks = torch.roll(target["masks"], 2, dims=2)[:, None].float()
        predictions.append(
            {
                "boxes": boxes,
                "scores": torch.from_numpy(rng.random(len(boxes))).float(),
                "labels": target["labels"],
                "masks": masks,
            }
        )
    seed_s = median_seconds(lambda: seed_evaluate(root, test, predictions), repeats)
    lean_s = median_seconds(lambda: coco_eval(cache, test, predictions, verbose=False), repeats)
    seed_stats = seed_evaluate(root, test, predictions)
    lean_stats = coco_eval(cache, test, predictions, verbose=False)
    same = all(np.allclose(seed_stats[kind], lean_stats[kind]["stats"], atol=1e-4) for kind in ("bbox", "segm"))
    rows = [
        (
            "eval",
            f"score {len(test)} test images, seconds (stats identical: {same})",
            "references' CocoEvaluator approach",
            seed_s,
            lean_s,
            seed_s / lean_s,
        )
    ]
    if torch.cuda.is_available():
        rows.append(evaluation_on_device(root, repeats, scratch, torch.device("cuda")))
    return rows


def evaluation_on_device(root, repeats, scratch, device, min_size=800, max_size=1333):
    """Seconds to evaluate the 50 test images on `device`, predicting included: the tutorial's script's way
    (bench.seed_job.evaluate) against lean.evaluate.evaluate with lean's CUDA defaults, both from the same
    random init in the layout `--weights none` gives (a random model proposes the most regions: a worst case)."""
    from bench.seed_job import evaluate as seed_job_evaluate
    from bench.seed_job import loaders
    from lean.evaluate import evaluate

    torch.manual_seed(0)
    reference = seed_model_from_scratch(min_size, max_size)
    spec = ModelSpec("resnet50_fpn", ("person",), min_size, max_size, pretrained=False)
    speed = Speed.for_device(device)
    model = tune_for_speed(build_model(spec, reference.state_dict()).to(device), speed)
    reference.to(device)
    _, test_loader, test = loaders(root, 50, 0)
    cache = scratch_cache(root, scratch)  # its images are the PNGs' in sorted order, as the seed's Dataset lists them
    seed_s = median_seconds(lambda: seed_job_evaluate(reference, test_loader, test, root, device), repeats)
    lean_s = median_seconds(lambda: evaluate(model, cache, test, device, speed.amp, verbose=False), repeats)
    measure = f"evaluate {len(test)} test images on {device.type}, predicting included, {min_size}/{max_size}, seconds"
    return ("eval", measure, "the tutorial's script (bench.seed_job)", seed_s, lean_s, seed_s / lean_s)


def print_header(header):
    print(header)
    print("| section | measure | seed pipeline | seed | lean | lean vs seed |")
    print("|---|---|---|---|---|---|", flush=True)


def print_row(section, measure, baseline, seed, lean, ratio):
    ratio_text = "-" if ratio != ratio else f"{ratio:.2f}x"
    seed_text = "-" if baseline == "-" else f"{seed:.3g}"
    print(f"| {section} | {measure} | {baseline} | {seed_text} | {lean:.3g} | {ratio_text} |", flush=True)


def parse_args(argv):
    parser = Parser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    parser.add_argument(
        "--sections", nargs="+", choices=["data", "coco", "train", "eval"], default=["data", "train", "eval"]
    )
    parser.add_argument("--coco-images", type=int, default=500, help="photos in the coco section's dataset")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per side")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inductor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time lean with its backbone compiled by inductor (lean.train --compile inductor)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # lean's process-wide settings, made before either side runs: the ratios leave them out.
    keep_freed_memory()
    set_recompile_limit(RECOMPILE_LIMIT)
    root = default_root(args.root)
    python = f"{platform.python_implementation()} {platform.python_version()}"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {python}, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print_header(f"{machine}; {date}; medians of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lean-bench-") as scratch:
        sections = {
            "data": lambda: data_section(root, args.repeats, Path(scratch)),
            "eval": lambda: eval_section(root, args.repeats, Path(scratch)),
            "coco": lambda: coco_section(args.repeats, Path(scratch), args.coco_images),
            "train": lambda: train_section(
                root,
                args.train_steps,
                args.train_warmup,
                args.min_size,
                args.max_size,
                torch.device(args.device),
                args.inductor,
                Path(scratch),
            ),
        }
        for name in ("data", "coco", "eval", "train"):
            if name in args.sections:
                for row in sections[name]():  # printed as measured: a long run shows its figures as it goes
                    print_row(*row)
                    rows.append(row)
    if args.json:
        fields = ("section", "measure", "seed_pipeline", "seed", "lean", "ratio")
        args.json.write_text(
            json.dumps({"machine": machine, "date": date, "rows": [dict(zip(fields, row)) for row in rows]}, indent=1)
        )


if __name__ == "__main__":
    run(main)
