"""python -m lean.train: fine-tune Mask R-CNN on a lean cache, as the tutorial does, faster and resumably.

The tutorial's schedule by default: 10 epochs of batch 2, SGD (lr 0.005,
momentum 0.9, weight decay 5e-4), a linear warmup from lr/1000 over the
first min(1000, iterations per epoch - 1) iterations, and lr x 0.1 every 3
epochs. Under torchrun each process takes its shard of every epoch; --lr is
the rate for the total batch (batch size x processes).
"""

import argparse
import json
import signal
import statistics
import sys
import time
from collections import defaultdict, deque
from datetime import datetime, timedelta
from pathlib import Path

import torch

from lean import distributed
from lean.cache import Cache, build
from lean.checkpoint import copy_atomically, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lean.cli import Parser, run
from lean.errors import LeanError
from lean.evaluate import coco_eval, predict_split
from lean.loader import Loader, split_indices
from lean.model import BACKBONES, build_model, tune_for_speed
from lean.sources import PennFudanSource, default_root

DEFAULT_CACHE = Path("cache/pennfudan.h5")
EXIT_DIVERGED = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteLoss(Exception):
    pass


# --- the schedule ---------------------------------------------------------------------------------


def lr_factor(iteration, iterations_per_epoch, step_epochs=3, gamma=0.1, warmup_factor=1e-3, warmup_limit=1000):
    """The multiple of the base learning rate at a global iteration: the tutorial's warmup times its StepLR."""
    epoch = iteration // iterations_per_epoch
    factor = gamma ** (epoch // step_epochs)
    warmup_iterations = min(warmup_limit, iterations_per_epoch - 1)
    if epoch == 0 and iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model, lr, kind="sgd", weight_decay=5e-4):
    """The tutorial's SGD (momentum 0.9), or AdamW, which trains a network from scratch in far fewer steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)


def make_scheduler(optimizer, iterations_per_epoch, step_epochs=3):
    """Stepped once per iteration, so its state is the global iteration and resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, iterations_per_epoch, step_epochs))


# --- one step -------------------------------------------------------------------------------------


def train_step(model, images, targets, optimizer, scheduler, scaler, amp_dtype, clip_norm=None):
    """images/targets -> loss dict -> sum -> backward -> clip -> step; returns the detached losses, total first."""
    with torch.autocast(images[0].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return torch.stack([total.detach(), *(loss.detach().float() for loss in losses.values())]), list(losses)


# --- logging --------------------------------------------------------------------------------------


class Window:
    """Recent values (median over the window) and the running mean of every value, like the tutorial's log."""

    def __init__(self, size=20):
        self.recent, self.total, self.count = deque(maxlen=size), 0.0, 0

    def add(self, value):
        self.recent.append(value)
        self.total += value
        self.count += 1

    def __str__(self):
        return f"{statistics.median(self.recent):.4f} ({self.total / self.count:.4f})"


class Monitor:
    """Watches the losses: stops on a non-finite one, logs a line and metrics every --log-every iterations.

    Losses stay on the device until a window is read, so a CUDA step never
    waits for the host; on the CPU there is nothing to wait for, and each
    step is checked at once.
    """

    def __init__(self, loader, optimizer, process, metrics, log_every, total_iterations, start_iteration=0):
        self.loader, self.optimizer, self.process, self.metrics = loader, optimizer, process, metrics
        self.log_every, self.total_iterations = log_every, total_iterations
        self.started, self.start_iteration = time.perf_counter(), start_iteration  # a resumed run's ETA counts its own pace
        self.pending = []  # (iteration, losses on the device) not read yet
        self.new_epoch()

    def new_epoch(self):
        self.windows = defaultdict(Window)
        self.window_started, self.wait_before = time.perf_counter(), self.loader.wait_seconds

    def add(self, epoch, batch_index, iteration, losses, names):
        self.pending.append((iteration, losses))
        last_of_epoch = batch_index + 1 == len(self.loader)
        if iteration == 1 or iteration % self.log_every == 0 or iteration >= self.total_iterations or last_of_epoch:
            self.flush(epoch, batch_index, names)
        elif self.loader.device.type == "cpu":
            check_finite([iteration], losses.view(1, -1), names)

    def flush(self, epoch, batch_index, names):
        if not self.pending:
            return
        values = torch.stack([losses for _, losses in self.pending]).cpu()  # the one host sync per window
        iterations = [iteration for iteration, _ in self.pending]
        check_finite(iterations, values, names)
        if self.process.distributed:
            values = distributed.mean_over_processes(values.to(self.loader.device), self.process).cpu()
        self.pending = []
        for row in values.tolist():
            for name, value in zip(["loss", *names], row):
                self.windows[name].add(value)
        if self.process.main:
            self._write(epoch, batch_index, iterations, values.tolist(), names)
        self.window_started, self.wait_before = time.perf_counter(), self.loader.wait_seconds

    def _write(self, epoch, batch_index, iterations, rows, names):
        elapsed = time.perf_counter() - self.window_started
        images_per_second = len(rows) * self.loader.batch_size * self.process.world_size / max(elapsed, 1e-9)
        iteration = iterations[-1]
        done_here = iteration - self.start_iteration
        eta = (time.perf_counter() - self.started) / done_here * (self.total_iterations - iteration)
        memory = torch.cuda.max_memory_allocated() / 2**20 if self.loader.device.type == "cuda" else 0.0
        wait = self.loader.wait_seconds - self.wait_before
        lr = self.optimizer.param_groups[0]["lr"]
        losses_text = "  ".join(f"{name}: {window}" for name, window in self.windows.items())
        width = len(str(len(self.loader)))
        print(f"Epoch: [{epoch}]  [{batch_index + 1:>{width}}/{len(self.loader)}]  eta: {timedelta(seconds=round(eta))}  "
              f"lr: {lr:.6f}  {losses_text}  images/s: {images_per_second:.2f}  data: {wait:.3f}s  "
              f"graphs: {graphs_compiled()} ({compile_seconds():.0f} s compiling)  max mem: {memory:.0f}MB", flush=True)
        for done, row in zip(iterations, rows):
            self.record({"epoch": epoch, "iteration": done, **dict(zip(["loss", *names], row))})
        self.record({"epoch": epoch, "iteration": iteration, "lr": lr, "images_per_second": images_per_second,
                     "data_wait_s": wait, "window_s": elapsed, "graphs_compiled": graphs_compiled(),
                     "compile_s": compile_seconds()})

    def record(self, entry):
        if self.metrics:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()


def check_finite(iterations, values, names):
    """Raise NonFiniteLoss for the first row of `values` (total, then each of `names`) that is not finite."""
    for iteration, row in zip(iterations, values):
        if not torch.isfinite(row).all():
            parts = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, row[1:].tolist()))
            raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: {parts}")


def parse_args(argv):
    parser = Parser(prog="python -m lean.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built on first use from PennFudan if missing")
    data.add_argument("--test-size", type=int, help="images held out for evaluation (default: 50, or a fifth of a small set)")
    data.add_argument("--seed", type=int, default=0, help="split, batch order, flips and initialisation")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default="resnet50_fpn")
    model.add_argument("--weights", default="coco", help="coco, none, or a state dict / lean checkpoint file")
    model.add_argument("--min-size", type=int, default=800)
    model.add_argument("--max-size", type=int, default=1333)
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=10)
    schedule.add_argument("--max-iters", type=int, help="stop after this many iterations in all")
    schedule.add_argument("--batch-size", type=int, default=2, help="per process")
    schedule.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (momentum 0.9) as the tutorial, or adamw")
    schedule.add_argument("--lr", type=float, default=0.005, help="for the total batch, all processes together")
    schedule.add_argument("--weight-decay", type=float, default=5e-4)
    schedule.add_argument("--lr-step-epochs", type=int, default=3, help="lr x 0.1 every this many epochs")
    schedule.add_argument("--clip-grad", type=float, help="clip the gradient norm to this")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    speed.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: bf16 where the hardware computes in it, else off")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="default: on where bf16 is (CUDA, CPUs with bf16 hardware), else off")
    # Opt-in: measured, compiling the backbone bought no speed and cost minutes (H200 at 800/1333 px: 31.4
    # against 31.5 images/s eager, after 244 s of compiling; 2-core CPU: 5-8 minutes, steps no faster).
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the backbone")
    speed.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across processes (where the backbone has it)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", type=Path, help="default: runs/<timestamp>")
    run_group.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    run_group.add_argument("--no-eval", action="store_true", help="skip the evaluation after each epoch")
    run_group.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs, and after the last")
    run_group.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "log_every", "min_size", "max_size", "lr_step_epochs", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be at least 1")
    if args.lr <= 0:
        parser.error("argument --lr: must be positive")
    if args.weight_decay < 0:
        parser.error("argument --weight-decay: must not be negative")
    if args.resume and args.out is None:
        parser.error("argument --resume: needs --out, the run folder to continue")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch sees no CUDA device; use --device cpu")
    if args.amp == "fp16" and args.device == "cpu":
        parser.error("argument --amp: fp16 is for CUDA; use bf16 or off on the CPU")
    return args


def bf16_is_fast(device):
    """bf16 pays off where the hardware computes in it; elsewhere it is emulated, and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def channels_last_is_fast(device):
    """Channels-last pays off on GPUs and on CPUs that compute in bf16 (oneDNN's native layout there). On a
    CPU computing in fp32 it does not: on an AVX2 EPYC, the backward of the 3 x 3 convolutions at the FPN's
    finest level took 1.9x as long channels-last, and a 320/512 step's convolution backward 2.76 s against 2.03 s."""
    return device.type == "cuda" or bf16_is_fast(device)


def amp_dtype(choice, device):
    if choice is None:
        choice = "bf16" if bf16_is_fast(device) else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def open_cache(path):
    if not path.exists():
        if path != DEFAULT_CACHE:
            raise LeanError(f"--cache {path}: no such file; build it with python -m lean.cache build --out {path}")
        print(f"{path} is missing: building it first (python -m lean.cache build)", file=sys.stderr)
        build(PennFudanSource(default_root()), path)
    return Cache(path)


def graphs_compiled():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_seconds():
    """Seconds spent compiling so far: dynamo's graphs with their forward code, and backward code, which is
    compiled when a graph's first backward runs."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(phase, ())) for phase in ("_compile.compile_inner", "backward._backward_impl"))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    process = distributed.start(device.type)
    try:
        return train(args, device, process)
    finally:
        distributed.stop(process)


def train(args, device, process):
    if process.distributed and device.type == "cuda":
        device = torch.device("cuda", process.local_rank)
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    checkpoint_path = out / "last.pt"
    if args.resume and not checkpoint_path.is_file():
        raise LeanError(f"--resume: {checkpoint_path} does not exist")
    if process.main:
        out.mkdir(parents=True, exist_ok=True)

    cache = open_cache(args.cache)
    try:
        train_indices, test_indices = split_indices(len(cache), args.seed, args.test_size)
    except ValueError as error:
        raise LeanError(f"--test-size: {error}") from None
    loader = Loader(cache, args.batch_size, shuffle=True, seed=args.seed, device=device, indices=train_indices,
                    train=True, rank=process.rank, world_size=process.world_size, dtype=torch.uint8)
    iterations_per_epoch = len(loader)

    torch.manual_seed(args.seed)
    model = build_model(2, args.backbone, args.weights, args.min_size, args.max_size).to(device)
    channels_last = channels_last_is_fast(device) if args.channels_last is None else args.channels_last
    model = tune_for_speed(model, channels_last, args.compile)
    if args.sync_bn and process.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args.lr, args.optimizer, args.weight_decay)
    scheduler = make_scheduler(optimizer, iterations_per_epoch, args.lr_step_epochs)
    precision = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

    start_epoch, start_batch, iteration, best_segm_ap = 0, 0, 0, -1.0
    if args.resume:
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, iteration = state["epoch"], state["batch"], state["iteration"]
        best_segm_ap = state["best_segm_ap"]
        set_rng_state(state["rng"])
        log(process, f"resuming {checkpoint_path} at epoch {start_epoch}, batch {start_batch}, iteration {iteration}")
    trainable = model
    if process.distributed:
        trainable = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    total_iterations = iterations_per_epoch * args.epochs
    if args.max_iters:
        total_iterations = min(total_iterations, args.max_iters)
    log(process, f"training {args.backbone} on {len(train_indices)} images ({len(test_indices)} held out), "
        f"{iterations_per_epoch} iterations/epoch x {args.epochs} epochs, batch {args.batch_size} x {process.world_size} "
        f"process(es), {device}, amp {precision}, channels-last {channels_last}, compile {args.compile}; writing {out}")

    stop_signal = []

    def request_stop(signum, _frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the run at once

    previous = {signum: signal.signal(signum, request_stop) for signum in EXIT_SIGNAL}

    def checkpoint(epoch, batch, iteration):
        if process.main:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "iteration": iteration,
                "rng": rng_state(), "best_segm_ap": best_segm_ap, "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            })

    metrics = (out / "metrics.jsonl").open("a") if process.main else None
    monitor = Monitor(loader, optimizer, process, metrics, args.log_every, total_iterations, iteration)
    try:
        trainable.train()
        for epoch in range(start_epoch, args.epochs):
            if iteration >= total_iterations:
                break
            loader.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            monitor.new_epoch()
            for batch_index, (images, targets) in enumerate(loader, start=loader.start_batch):
                losses, names = train_step(trainable, images, targets, optimizer, scheduler, scaler, precision, args.clip_grad)
                iteration += 1
                monitor.add(epoch, batch_index, iteration, losses, names)
                if stop_signal:
                    monitor.flush(epoch, batch_index, names)
                    checkpoint(epoch, batch_index + 1, iteration)
                    log(process, f"stopped by signal at epoch {epoch}, iteration {iteration}; saved {checkpoint_path}; continue with --resume")
                    return EXIT_SIGNAL[stop_signal[0]]
                if iteration >= total_iterations:
                    break

            improved = False
            last_epoch = epoch + 1 == args.epochs or iteration >= total_iterations
            if process.main and not args.no_eval and ((epoch + 1) % args.eval_every == 0 or last_epoch):
                # Eager: each test-image shape would be one more compiled graph, costing more than 50 images take.
                with torch.compiler.set_stance("force_eager"):
                    predictions = predict_split(model, cache, test_indices, device, precision)
                report = coco_eval(cache, test_indices, predictions)
                monitor.record({"epoch": epoch, **{kind: values["stats"] for kind, values in report.items()}})
                improved, best_segm_ap = report["segm"]["AP"] > best_segm_ap, max(report["segm"]["AP"], best_segm_ap)
                trainable.train()
            finished = iteration % iterations_per_epoch == 0
            checkpoint(epoch + 1 if finished else epoch, 0 if finished else iteration - epoch * iterations_per_epoch, iteration)
            if improved:
                copy_atomically(checkpoint_path, out / "best.pt")
    except NonFiniteLoss as error:
        print(f"error: {error}; {checkpoint_path} keeps the last good state", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if metrics:
            metrics.close()
    log(process, f"done: {iteration} iterations in {timedelta(seconds=round(time.perf_counter() - monitor.started))}; {checkpoint_path}")
    return 0


def log(process, message):
    if process.main:
        print(message, flush=True)


if __name__ == "__main__":
    run(main)
