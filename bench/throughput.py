"""python -m bench.throughput: lean against the tutorial's own pipeline, measured side by side in one run; each
section (data, coco, train, eval, export) lives in bench/<section>_section.py. The export section (not run
unless asked for) sets the exported files against lean's eager model.

Every lean figure is printed beside the seed figure measured in the same
process on the same files, with the ratio. Medians over --repeats passes,
after one warm-up pass so both sides read from a warm page cache.
"""

import argparse
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.coco_section import coco_section
from bench.common import print_header, print_row
from bench.data_section import data_section
from bench.eval_section import eval_section
from bench.export_section import export_section
from bench.train_section import train_section
from lean.cli import Parser, add_device_argument, check_device, run
from lean.pennfudan import default_root
from lean.speed import configure_process

OFFLINE = "pass --root DIR with a PennFudan folder, or run --sections coco alone (it generates its photos)"


def parse_args(argv):
    parser = Parser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    parser.add_argument(
        "--sections", nargs="+", choices=["data", "coco", "train", "eval", "export"], default=["data", "train", "eval"]
    )
    parser.add_argument("--coco-images", type=int, default=500, help="photos in the coco section's dataset")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per side")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    add_device_argument(parser)
    parser.add_argument(
        "--inductor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time lean with its backbone compiled by inductor (lean.train --compile inductor)",
    )
    parser.add_argument("--tasks", nargs="+", choices=["segment", "detect"], default=["segment", "detect"],
                        help="train and export sections: Mask R-CNN, Faster R-CNN, or both")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    configure_process()  # lean's process-wide settings, made before either side runs: the ratios leave them out
    root = None if args.sections == ["coco"] else default_root(args.root, advice=OFFLINE)
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
            "export": lambda: export_section(root, args.repeats, Path(scratch), args.tasks),
            "train": lambda: train_section(
                root,
                args.train_steps,
                args.train_warmup,
                args.min_size,
                args.max_size,
                torch.device(args.device),
                args.inductor,
                Path(scratch),
                args.tasks,
            ),
        }
        for name in ("data", "coco", "eval", "train", "export"):
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
