"""python -m lean.cache build|info|verify|export: make, describe, check and write out a cache.

build --source pennfudan [--root DIR]                  a PennFudan folder
build --source coco --annotations FILE [--images DIR]  a COCO JSON and its images (default: its folder)
build --source synthetic [--num-images N --seed S]     generated pedestrians (--classes K: K kinds)
export CACHE --coco DIR                                DIR/annotations.json and the images, for any COCO tool
"""

import os
import signal
from pathlib import Path

import numpy as np

from lean.cache.export import export_coco
from lean.cache.reader import Cache
from lean.cache.verify import first_corrupted, first_mismatch
from lean.cache.writer import PIXELS, build
from lean.cli import Parser
from lean.progress import Progress
from lean.sources import KINDS as SOURCES
from lean.sources import open_source
from lean.synthetic import KINDS
from lean.targets import is_degenerate

DEFAULT_OUT = {"pennfudan": Path("cache/pennfudan.h5"), "synthetic": Path("cache/synthetic.h5")}


def parse_args(argv):
    parser = Parser(prog="python -m lean.cache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser(
        "build", help="build a cache from a PennFudan folder, a COCO file or the synthetic source"
    )
    make.add_argument("--source", choices=SOURCES, default="pennfudan")
    make.add_argument(
        "--root", type=Path, help="PennFudan folder (default: $LEAN_PENNFUDAN, data/PennFudanPed, or download)"
    )
    make.add_argument("--annotations", type=Path, help="COCO source: the annotation JSON")
    make.add_argument(
        "--images", type=Path, help="COCO source: the folder file_name is relative to (default: the JSON's)"
    )
    make.add_argument("--pixels", choices=PIXELS, help="raw (decoded) or encoded (the files' bytes); "
                      "default: raw while the decoded images take under 2 GiB")  # fmt: skip
    make.add_argument("--out", type=Path, help="cache file (default: cache/<source>.h5, or beside the JSON)")
    make.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: one per core)")
    make.add_argument("--num-images", type=int, default=200, help="synthetic source: how many images")
    make.add_argument("--seed", type=int, default=0, help="synthetic source: which images")
    make.add_argument("--classes", type=int, default=1, help=f"synthetic source: kinds of figure, 1 to {len(KINDS)}")
    make.add_argument("--boxes-only", action="store_true", help="synthetic source: boxes alone, as a detection export")
    make.add_argument("--rare", type=int, default=1, metavar="R",
                      help="synthetic source: the last class drawn R times less often than each other")  # fmt: skip

    describe = commands.add_parser("info", help="what a cache holds")
    describe.add_argument("path", type=Path)

    check = commands.add_parser("verify", help="derive every example again and compare with the cache")
    check.add_argument("path", type=Path)
    check.add_argument("--root", type=Path, help="PennFudan folder, if not where the cache was built from")
    check.add_argument("--annotations", type=Path, help="COCO JSON, if not where the cache was built from")
    check.add_argument("--images", type=Path, help="COCO images folder, if not where the cache was built from")

    write = commands.add_parser("export", help="write a cache out as images and a COCO JSON")
    write.add_argument("path", type=Path)
    write.add_argument("--coco", type=Path, required=True, help="folder for annotations.json and the images")

    args = parser.parse_args(argv)
    if args.command == "build":
        if args.workers < 0:
            parser.error(f"argument --workers: must be 0 or more, got {args.workers}")
        if args.num_images < 1:
            parser.error(f"argument --num-images: must be at least 1, got {args.num_images}")
        if args.seed < 0:
            parser.error(f"argument --seed: must not be negative, got {args.seed}")
        if not 1 <= args.classes <= len(KINDS):
            parser.error(f"argument --classes: must be 1 to {len(KINDS)}, got {args.classes}")
        if args.source != "synthetic" and args.classes != 1:
            parser.error("argument --classes: applies to --source synthetic only")
        if args.rare < 1:
            parser.error(f"argument --rare: must be at least 1, got {args.rare}")
        if args.rare != 1 and (args.source != "synthetic" or args.classes < 2):
            parser.error("argument --rare: applies to --source synthetic with --classes 2 or more")
        if args.source != "synthetic" and args.boxes_only:
            parser.error("argument --boxes-only: applies to --source synthetic only (a COCO file without "
                         "segmentations gives boxes alone by itself)")  # fmt: skip
        if args.source != "pennfudan" and args.root is not None:
            parser.error("argument --root: applies to --source pennfudan only")
        if (args.source == "coco") != (args.annotations is not None):
            parser.error("argument --annotations: the COCO JSON, for --source coco (and only for it)")
        if args.source != "coco" and args.images is not None:
            parser.error("argument --images: applies to --source coco only")
    return args


def build_params(args):
    """The build's arguments as the params a cache records of its source."""
    if args.source == "synthetic":
        return {"source": "synthetic", "num_images": args.num_images, "seed": args.seed, "classes": args.classes,
                "boxes_only": args.boxes_only, "rare": args.rare}  # fmt: skip
    if args.source == "coco":
        return {"source": "coco", "annotations": args.annotations, "images": args.images}
    return {"source": "pennfudan", "root": args.root}


def command_build(args):
    source = open_source(build_params(args), download=True)
    out = args.out or (args.annotations.with_suffix(".h5") if args.source == "coco" else DEFAULT_OUT[args.source])
    build(source, out, workers=args.workers, pixels=args.pixels)
    skipped = "".join(f"; skipped {count} {why}" for why, count in source.skipped.items())
    kind = "" if source.masks else ", boxes alone"
    print(f"wrote {out} ({len(source)} images{kind}{skipped})")


def command_info(args):
    cache = Cache(args.path)
    boxes, crowd = cache.instances["boxes"], int(cache.instances["iscrowd"].sum())
    per_image = np.diff(cache.instance_offsets)
    negatives = int((per_image == 0).sum())
    heights, widths = cache.sizes[:, 0], cache.sizes[:, 1]
    pixels = int((heights * widths).sum())
    stored = int(cache.pixel_offsets[-1]) * (3 if cache.stored == "raw" else 1)
    per_label = np.bincount(cache.instances["labels"], minlength=len(cache.classes) + 1)[1:]
    classes = zip(range(1, len(cache.classes) + 1), cache.classes, cache.category_ids, per_label)
    rows = [
        ("file", f"{args.path} ({os.path.getsize(args.path) / 2**20:.1f} MiB)"),
        ("source", ", ".join(f"{key}={value}" for key, value in cache.params.items())),
        ("images", f"{len(cache)} ({heights.min()}-{heights.max()} x {widths.min()}-{widths.max()} px, H x W)"),
        ("pixels", f"{pixels} stored {cache.stored} ({stored / 2**20:.1f} MiB)"),
        (
            "instances",
            f"{len(boxes)} ({per_image.min()}-{per_image.max()} per image, {negatives} images without any, "
            f"{crowd} crowd)",
        ),
        (
            "masks",
            f"{cache.mask_offsets[-1] / 2**20:.2f} MiB, each cropped to its box and bit-packed"
            if cache.has_masks
            else "none: boxes alone (train with --task detect)",
        ),
        (
            "classes",
            ", ".join(f"{label} {name} (id {category}, {count} instances)" for label, name, category, count in classes),
        ),
        ("degenerate", f"{int(is_degenerate(boxes).sum())} (zero-width or zero-height boxes; left out of training)"),
        *[("skipped", f"{count} {why}") for why, count in cache.skipped.items()],
        ("fingerprint", cache.fingerprint),
    ]
    for key, value in rows:
        print(f"{key:<12} {value}")


def command_verify(args):
    """Checksums first (no source needed); then, where the source is at hand, every example loaded again."""
    cache = Cache(args.path)
    damage = first_corrupted(cache, Progress(len(cache), "checksums"))
    if damage:
        print(f"MISMATCH {args.path}: {damage}")
        return 1
    source = open_source(cache.params, args.root, args.annotations, args.images)
    if source is None:
        print(f"OK {args.path}: {len(cache)} images match their checksums (the source is not at hand to compare with)")
        return 0
    mismatch = first_mismatch(cache, source, Progress(len(source), "verify"))
    if mismatch:
        print(f"MISMATCH {args.path}: {mismatch}")
        return 1
    print(f"OK {args.path}: {len(cache)} images match their checksums, and their targets match the source")
    return 0


def command_export(args):
    cache = Cache(args.path)
    path, renamed = export_coco(cache, args.coco, Progress(len(cache), "export"))
    print(f"wrote {path} and {len(cache)} images beside it")
    for original, name in renamed:
        print(f"{original} written as {name}: another image takes its name")


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a build stopped by SIGTERM cleans up as it does on Ctrl-C
    commands = {"build": command_build, "info": command_info, "verify": command_verify, "export": command_export}
    return commands[args.command](args)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt
