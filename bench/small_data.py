"""python -m bench.small_data presets|rare: the small-dataset options measured, as docs/convergence.md reports them.

presets: every augmentation preset with and without --color-jitter and with and without --ema, each trained
from scratch for the same wall time at each seed. Each setting's epoch is timed first (one epoch, no
evaluation, under the same parallel load), and each run gets the epochs that fit the budget, its learning
rate stepped at three quarters of them and its model scored once at the end.

rare: the same recipe on a set with a rare class, with and without --repeat-factor, equal epochs (repeated
images make an epoch longer: the epochs stay the unit of the schedule, as in detectron2), per-class AP.

Runs go `--jobs` at a time, each with its share of the cores; a finished run (its OUT/metrics.jsonl scored)
is read back rather than run again, so the study resumes where it stopped. Minutes to hours: never a test.
"""

import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lean.cli import Parser, run

RECIPE = ["--backbone", "resnet18_fpn", "--weights", "none", "--min-size", "128", "--max-size", "224",
          "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--amp", "off", "--no-compile"]  # fmt: skip
PRESETS = ("hflip", "multiscale", "lsj")
EMA_DECAY = "0.999"


def parse_args(argv):
    parser = Parser(prog="python -m bench.small_data", description=__doc__)
    parser.add_argument("study", choices=("presets", "rare"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--test-size", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=float, default=240.0, help="presets: training seconds a run")
    parser.add_argument("--epochs", type=int, default=20, help="rare: epochs a run")
    parser.add_argument("--repeat-factor", default="0.5", help="rare: the threshold of the run with it")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/small-data"))
    return parser.parse_args(argv)


def train(args, name, options, epochs):
    """The scored metrics of one run (a finished one read back), with its wall seconds."""
    out = args.out / name
    if (out / "done.json").is_file():
        return json.loads((out / "done.json").read_text())
    command = [sys.executable, "-m", "lean.train", "--cache", str(args.cache), "--test-size", str(args.test_size),
               *RECIPE, "--epochs", str(epochs), "--out", str(out), *options]  # fmt: skip
    if "--no-eval" not in options:
        command += ["--lr-step-epochs", str(max(1, round(0.75 * epochs))), "--eval-every", str(epochs)]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": threads})
    result = {"wall_s": time.perf_counter() - start, "epochs": epochs, **_scores(out / "metrics.jsonl")}
    (out / "done.json").write_text(json.dumps(result))
    return result


def _scores(metrics):
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    result = {"train_s": sum(r.get("window_s", 0.0) for r in records)}
    for record in records:
        result.update({key: record[key] for key in ("bbox", "segm", "per_class") if key in record})
    return result


def parallel(args, work):
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda item: item(), work))


def presets(args):
    settings = list(itertools.product(PRESETS, (False, True), (False, True)))

    def options(preset, jitter, ema, seed):
        return (["--augment", preset, "--seed", str(seed)] + ["--color-jitter"] * jitter
                + ["--ema", EMA_DECAY] * ema)  # fmt: skip

    timed = list(itertools.product(PRESETS, (False, True)))
    timings = parallel(args, [
        lambda p=p, j=j: train(args, f"time-{p}{'-jitter' * j}", [*options(p, j, False, 0), "--no-eval"], 1)
        for p, j in timed
    ])  # fmt: skip
    epoch_s = {setting: timing["train_s"] for setting, timing in zip(timed, timings)}
    epochs = {(p, j): max(1, round(args.budget / epoch_s[(p, j)])) for p, j in timed}
    names = {s: f"{s[0]}{'-jitter' * s[1]}{'-ema' * s[2]}" for s in settings}
    runs = [(s, seed) for seed in args.seeds for s in settings]
    results = parallel(args, [
        lambda s=s, seed=seed: train(args, f"{names[s]}-seed{seed}", options(*s, seed), epochs[s[:2]])
        for s, seed in runs
    ])  # fmt: skip
    by_run = dict(zip(runs, results))
    print("| setting | epochs (s an epoch) | " + " | ".join(f"seed {s}: bbox / segm AP" for s in args.seeds)
          + " | wall s |\n|---|---|" + "---|" * (len(args.seeds) + 1))  # fmt: skip
    for s in settings:
        scores = [by_run[(s, seed)] for seed in args.seeds]
        cells = " | ".join(f"{r['bbox'][0]:.3f} / {r['segm'][0]:.3f}" for r in scores)
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in scores)
        print(f"| {names[s]} | {epochs[s[:2]]} ({epoch_s[s[:2]]:.1f}) | {cells} | {walls} |")


def rare(args):
    runs = [(factor, seed) for seed in args.seeds for factor in (None, args.repeat_factor)]
    results = parallel(args, [
        lambda f=f, seed=seed: train(args, f"rare-{'rfs' + f if f else 'plain'}-seed{seed}",
                                     ["--seed", str(seed)] + (["--repeat-factor", f] if f else []), args.epochs)
        for f, seed in runs
    ])  # fmt: skip
    for (factor, seed), result in zip(runs, results):
        classes = "  ".join(f"{name} {ap['AP']:.3f}" for name, ap in result["per_class"]["bbox"].items())
        print(
            f"seed {seed}, --repeat-factor {factor or '-'}: {result['epochs']} epochs, {result['wall_s']:.0f} s, "
            f"bbox AP {result['bbox'][0]:.3f}, segm AP {result['segm'][0]:.3f}; per class (bbox) {classes}"
        )


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (presets if args.study == "presets" else rare)(args)


if __name__ == "__main__":
    run(main)
