"""python -m bench.export_models: every backbone and task lean trains, through lean.export to ONNX and
TorchScript, each file checked by lean.export against the model; one line each.

Each model trains one step from scratch on generated images (at 128/224, to be quick), then lean.export writes
both files and compares them with the checkpoint's model at --score-thresh (low, so that many detections are
compared). Too slow for the test suite (a few minutes on 2 cores), which exports the small model alone.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lean.cache import build
from lean.cli import Parser, run
from lean.model import BACKBONES, TASKS
from lean.synthetic import SyntheticSource


def parse_args(argv):
    parser = Parser(prog="python -m bench.export_models", description=__doc__)
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--score-thresh", type=float, default=0.05)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="lean-export-") as scratch:
        scratch = Path(scratch)
        cache = build(SyntheticSource(8, seed=0, classes=3), scratch / "data.h5", workers=0, progress=False)
        print("| backbone | task | result | seconds | ONNX MiB | TorchScript MiB |\n|---|---|---|---|---|---|")
        for backbone in args.backbones:
            for task in args.tasks:
                run_folder = scratch / f"{backbone}-{task}"
                train = [sys.executable, "-m", "lean.train", "--cache", str(cache), "--backbone", backbone, "--task",
                         task, "--weights", "none", "--min-size", "128", "--max-size", "224", "--max-iters", "1",
                         "--no-eval", "--test-size", "2", "--device", "cpu", "--out", str(run_folder)]  # fmt: skip
                subprocess.run(train, check=True, capture_output=True)
                files = run_folder / "model.onnx", run_folder / "model.pt"
                export = [sys.executable, "-m", "lean.export", str(run_folder / "last.pt"), "--onnx", str(files[0]),
                          "--torchscript", str(files[1]), "--score-thresh", str(args.score_thresh)]  # fmt: skip
                start = time.perf_counter()
                done = subprocess.run(export, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                result = "checked" if done.returncode == 0 else done.stderr.strip().splitlines()[-1]
                failed += done.returncode != 0
                sizes = [f"{path.stat().st_size / 2**20:.1f}" if path.exists() else "-" for path in files]
                print(f"| {backbone} | {task} | {result} | {seconds:.0f} | {sizes[0]} | {sizes[1]} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
