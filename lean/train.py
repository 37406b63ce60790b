"""python -m lean.train: fine-tune Mask R-CNN (or with --task detect, Faster R-CNN) on a lean cache, as the
tutorial does, faster and resumably.

The tutorial's schedule by default (lean.optim). Under torchrun each process
takes its shard of every epoch; --lr is the rate for the total batch (batch
size x processes). OUT/last.pt is written after every epoch and when SIGINT or
SIGTERM arrives; --resume continues from it.
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from lean import checkpoint, distributed
from lean.augment import Augment
from lean.background import Writer
from lean.board import INSTALL as INSTALL_TENSORBOARD
from lean.board import Board, tensorboard_missing
from lean.cache import Cache
from lean.cache import build as build_cache
from lean.canvas import too_thin
from lean.checkpoint import Checkpointer, Position, RunFolder, position_after
from lean.cli import Parser, add_device_argument, check_device, run
from lean.config import AUGMENTS, DEFAULT_CACHE, SettingError, TrainConfig
from lean.ema import WeightsEMA
from lean.engine import RunState, StopSignals, train_one_epoch, validation_losses
from lean.errors import LeanError
from lean.evaluate import detections, predict
from lean.graphs import capture_graphs
from lean.loader import Loader
from lean.model import BACKBONES, TASKS, ModelSpec, create_model
from lean.monitor import Monitor, NonFiniteLoss, StartUp, TrainingLog
from lean.optim import OPTIMIZERS, make_optimizer, make_scheduler
from lean.pennfudan import PennFudanSource, default_root
from lean.plot import Curves
from lean.sampling import repeat_factors, split_indices
from lean.scoring import Evaluations, InlineScorer, Scorer
from lean.speed import AMP, COMPILE, Speed, configure_process
from lean.weights import WeightsUnavailable

EXIT_DIVERGED = 3
OFFLINE = ("set LEAN_PENNFUDAN to a PennFudan folder, or build a cache of your own (python -m lean.cache build "
           "--help) and pass it with --cache")  # fmt: skip


def main(argv=None):
    start_up = StartUp()
    config = parse_args(argv)
    configure_process()
    device = torch.device(config.device)
    process = distributed.start(device.type)
    try:
        return train(config, device, process, start_up)
    finally:
        distributed.stop(process)


def train(config, device, process, start_up):
    if process.distributed and device.type == "cuda":
        device = torch.device("cuda", process.local_rank)
    start_up.mark("settings")
    cache, train_indices, test_cache, test_indices = datasets(config)  # inputs first: a bad one leaves no folder
    start_up.mark("caches")
    out = config.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    speed = Speed.for_device(
        device, config.amp, config.channels_last, config.compile, config.canvas_levels, config.batched_heads
    )
    spec, model = make_model(config, run_task(config, cache, test_cache), cache, speed, device, process)
    start_up.mark("model")
    graphs = capture_graphs(model, config.batch_size, speed.amp) if speed.compile == "graphs" else None
    if graphs is not None:
        start_up.mark("graphs")
    factors = config.repeat_factor and image_repeat_factors(cache, train_indices, config.repeat_factor)
    loader = Loader(cache, config.batch_size, seed=config.seed, device=device, indices=train_indices, train=True,
                    rank=process.rank, world_size=process.world_size, dtype=torch.uint8,
                    masks=spec.masks, repeat_factors=factors)  # fmt: skip
    optimizer = make_optimizer(model, config.lr, config.optimizer, config.weight_decay)
    scheduler = make_scheduler(optimizer, len(loader), config.lr_step_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=speed.amp == torch.float16)
    run_state = RunState(model, optimizer, scheduler, scaler, WeightsEMA(model, config.ema) if config.ema else None)
    writer = Writer()  # checkpoints and curves written off the training thread
    checkpointer = Checkpointer(
        out, run_state, spec, config, cache.fingerprint, process.world_size, process.main, writer
    )
    validation = None if config.no_eval or not process.main else Loader(
        test_cache, config.batch_size, shuffle=False, device=device, indices=test_indices, flip=False,
        dtype=torch.uint8, masks=spec.masks,
    )  # the held-out images as training takes them, for the validation loss  # fmt: skip
    augment = Augment(config.augment, config.color_jitter, config.seed, config.min_size)
    augment = augment if augment.active else None
    trained = distributed.wrap(model, process, device)  # what the step calls: under DDP, the wrapper
    total_iterations = min(len(loader) * config.epochs, config.max_iters or sys.maxsize)
    with (
        RunFolder(out, process.main),
        TrainingLog(out / "metrics.jsonl", process.main, config.resume, board(config, out, process)) as log,
        StopSignals() as stop,
        writer,
        scorer(config, device, test_cache, test_indices, spec, process) as scoring,
    ):
        evaluations = Evaluations(scoring, log, checkpointer, spec.main_metric)
        position = checkpointer.resume() if config.resume else Position()
        monitor = Monitor(loader, optimizer, process, config.log_every, total_iterations, position.iteration)
        curves = Curves(out)
        if config.resume:
            log.print(f"resuming {checkpointer.last} at epoch {position.epoch}, batch {position.batch}, "
                      f"iteration {position.iteration}")  # fmt: skip
        evaluated = len(test_indices)
        held = f"validating on {evaluated} of {test_cache.path}" if config.val_cache else f"{evaluated} held out"
        log.print(f"training {spec.backbone} on {len(train_indices)} images ({held}), "
                  f"{len(loader)} iterations/epoch x {config.epochs} epochs, batch {config.batch_size} x "
                  f"{process.world_size} process(es), {device}, {speed}; writing {out}")  # fmt: skip
        log.print(cpu_hint(config, device))
        log.print(graphs and graphs_line(graphs, device))
        if factors is not None:
            log.print(f"repeat-factor sampling (--repeat-factor {config.repeat_factor}): images taken x1 to "
                      f"x{factors.max():.2f}, {round(factors.sum())} an epoch of {len(factors)}")  # fmt: skip
        start_up.mark("loader, optimizer, run folder")
        log.print(str(start_up))
        if out_of_patience(config, checkpointer):
            log.print(f"{checkpointer.last}: the run stopped early, {checkpointer.since_best} evaluations without a "
                      f"better {spec.main_metric} AP; nothing left to do (--patience {config.patience})")  # fmt: skip
            return 0
        iteration = position.iteration
        model.train()
        try:
            for epoch in range(position.epoch, config.epochs):
                if iteration >= total_iterations:
                    break
                loader.set_epoch(epoch, position.batch if epoch == position.epoch else 0)
                iteration = train_one_epoch(trained, run_state, speed.amp, config.clip_grad, loader, epoch, iteration,
                                            total_iterations, monitor, log, stop, augment)  # fmt: skip
                last = iteration >= total_iterations
                if process.main and not stop.received and evaluation_due(config, epoch, last):
                    with run_state.ema.applied() if run_state.ema else contextlib.nullcontext():  # what is saved
                        losses = validation_losses(model, validation, speed.amp, config.seed)
                        predictions = predict(model, test_cache, test_indices, device, speed.amp)
                    log.print("validation " + "  ".join(f"{name[4:]}: {value:.4f}" for name, value in losses.items()))
                    log.record({"epoch": epoch, "iteration": iteration, **losses})
                    evaluations.start(epoch, detections(test_indices, predictions))
                # Then wait for every score; with --patience, for each as it comes, to stop where it runs out.
                finishing = stop.received or last or epoch + 1 == config.epochs or config.patience is not None
                checkpointer.save(position_after(iteration, len(loader)), *evaluations.collect(epoch, finishing))
                if process.main:
                    writer.submit(lambda: log.print(curves.update()))
                if config.patience and distributed.main_decides(out_of_patience(config, checkpointer), process, device):
                    log.print(f"stopping early: {checkpointer.since_best} evaluations without a better "
                              f"{spec.main_metric} AP than {checkpointer.best_ap:.4f} (--patience {config.patience}); "
                              f"best.pt keeps it")  # fmt: skip
                    break
                if stop.received:
                    writer.wait()
                    log.print(f"stopped by signal at epoch {epoch}, iteration {iteration}; saved {checkpointer.last}; "
                              "continue with --resume")  # fmt: skip
                    return stop.exit_status
        except NonFiniteLoss as error:
            print(f"error: {error}; {checkpointer.last} keeps the last good state", file=sys.stderr)
            return EXIT_DIVERGED
        if evaluations.latest is not None:
            writer.submit(lambda: log.print(curves.evaluation(evaluations.latest)))
        writer.wait()
        elapsed = timedelta(seconds=round(time.perf_counter() - monitor.started))
        log.print(f"done: {iteration} iterations in {elapsed}; {checkpointer.last}")
    return 0


def board(config, out, process):
    """TensorBoard event files in OUT/tensorboard, with --tensorboard, on the main process."""
    return Board(out / "tensorboard") if config.tensorboard and process.main else None


def out_of_patience(config, checkpointer):
    return config.patience is not None and checkpointer.since_best >= config.patience


def scorer(config, device, cache, indices, spec, process):
    """Where the run's evaluations are scored: in a process of their own on a GPU, while training goes on; at
    once on a CPU, whose cores the step fills; nowhere without evaluations or off the main process."""
    if config.no_eval or not process.main:
        return contextlib.nullcontext()
    kind = Scorer if device.type == "cuda" else InlineScorer
    return kind(cache.path, indices, spec.metrics)


def image_repeat_factors(cache, indices, threshold):
    """Each training image's repeat factor (lean.sampling.repeat_factors), from the classes of its instances that
    training takes (crowd regions aside)."""
    labels = []
    for i in indices:
        instances = cache.instance_targets(i)
        labels.append(instances["labels"][instances["iscrowd"] == 0])
    return repeat_factors(labels, threshold)


def evaluation_due(config, epoch, last_iteration):
    """After every --eval-every-th epoch and after the run's last, unless --no-eval."""
    return not config.no_eval and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs or last_iteration)


def graphs_line(graphs, device):
    recorded, seconds = graphs
    if not recorded:
        return f"--compile graphs: CUDA graphs need a GPU, and this run is on {device}: its steps run eager"
    return f"--compile graphs: {recorded} CUDA graphs recorded in {seconds:.1f} s (backbone and RPN head, each canvas)"


def cpu_hint(config, device):
    """One line of what to expect, for the tutorial's model at its sizes on a CPU; None elsewhere."""
    if device.type != "cpu" or not config.backbone.startswith("resnet50_fpn") or config.max_size <= 640:
        return None
    sizes = f"{config.min_size}/{config.max_size} px"
    return (f"on a CPU a resnet50_fpn step at {sizes} takes seconds to a minute (hours for 10 epochs); "
            "--backbone mobilenet_v3_fpn --min-size 320 --max-size 512 trains many times faster")  # fmt: skip


def open_cache(path, flag="--cache"):
    if not path.exists():
        if path != DEFAULT_CACHE:
            raise LeanError(f"{flag} {path}: no such file; build it with python -m lean.cache build --out {path}")
        print(f"{path} is missing: building it first (python -m lean.cache build)", file=sys.stderr)
        build_cache(PennFudanSource(default_root(advice=OFFLINE)), path)
    return Cache(path)


def given_flags(parser, argv):
    """{field: value} of the flags on the command line: argparse fills in defaults only where the namespace has none."""
    unset = object()
    namespace = argparse.Namespace(**{field.name: unset for field in dataclasses.fields(TrainConfig)})
    return {key: value for key, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


def resumed(config, given):
    """The config to resume with: OUT/last.pt's, changed only as RESUMABLE allows."""
    last = config.out / "last.pt"
    if not last.is_file():
        raise LeanError(f"--resume: {last} does not exist")
    return checkpoint.resumed_config(last, given)


def datasets(config):
    """(the training cache, its images to train on, the cache to evaluate on, its images to evaluate): a seeded
    split of --cache, or all of --cache and all of --val-cache."""
    cache = open_cache(config.cache)
    check_sizes(cache, config)
    if not cache.instance_offsets[-1]:
        raise LeanError(f"--cache {cache.path}: no image has an instance to learn from")
    if config.val_cache:
        val = open_cache(config.val_cache, "--val-cache")
        check_sizes(val, config)
        if not val.instance_offsets[-1] and not config.no_eval:
            raise LeanError(f"--val-cache {val.path}: no image has an instance, so there is no AP to measure")
        if (val.classes, val.category_ids) != (cache.classes, cache.category_ids):
            theirs, ours = (
                f"{list(val.classes)} (ids {list(val.category_ids)})",
                f"{list(cache.classes)} (ids {list(cache.category_ids)})",
            )
            raise LeanError(f"--val-cache {val.path}: its classes {theirs} are not the training cache's {ours}")
        return cache, np.arange(len(cache)), val, np.arange(len(val))
    try:
        train_indices, test_indices = split_indices(len(cache), config.seed, config.test_size)
    except ValueError as error:
        where = "--test-size" if config.test_size is not None else f"--cache {cache.path}"  # the user's word
        raise LeanError(f"{where}: {error}") from None
    return cache, train_indices, cache, test_indices


def run_task(config, cache, val):
    """--task, or by default the cache's: segment where it has masks, detect where it holds boxes alone; one line
    where a cache cannot serve the task asked for."""
    task = config.task or ("segment" if cache.has_masks else "detect")
    for flag, data in (("--cache", cache), ("--val-cache", val)):
        if task == "segment" and not data.has_masks:
            raise LeanError(f"{flag} {data.path}: holds boxes alone, no masks to train or score a Mask R-CNN on; "
                            "train a Faster R-CNN with --task detect")  # fmt: skip
    return task


def check_sizes(cache, config):
    """One line naming the first image of `cache` the model cannot take at the run's sizes, and how many more."""
    thin = [(i, why) for i, (h, w) in enumerate(cache.sizes.tolist())
            if (why := too_thin(h, w, config.min_size, config.max_size))]  # fmt: skip
    if thin:
        first, why = thin[0]
        more = f" (and {len(thin) - 1} more)" if len(thin) > 1 else ""
        raise LeanError(f"{cache.path}: image {cache.names[first]}{more}: {why}; leave it out of the dataset")


def make_model(config, task, cache, speed, device, process):
    """(ModelSpec, model on `device` with `speed` applied) for the cache's classes and `task`, from --backbone,
    --weights and the sizes."""
    pretrained = config.weights != "none"
    spec = ModelSpec(
        config.backbone, cache.classes, config.min_size, config.max_size, pretrained, cache.category_ids, task
    )
    state = None
    if config.weights not in ("coco", "none"):
        try:
            state, pretrained = checkpoint.read_weights(config.weights)
        except LeanError as error:
            raise LeanError(f"--weights {error}") from None
        spec = dataclasses.replace(spec, pretrained=pretrained)
    torch.manual_seed(config.seed)
    try:
        model = create_model(spec, state, speed, device, download=config.weights == "coco")
    except WeightsUnavailable as error:
        raise LeanError(f"{error}; train from scratch with --weights none, "
                        "or pass --weights FILE with a state dict or lean checkpoint") from None  # fmt: skip
    except LeanError as error:
        raise LeanError(f"--weights {config.weights}: {error}") from None
    if config.sync_bn and process.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return spec, model


def parse_args(argv):
    defaults = TrainConfig()
    parser = Parser(
        prog="python -m lean.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--cache", type=Path, default=defaults.cache, help="built on first use from PennFudan if missing")
    data.add_argument("--val-cache", type=Path, help="evaluate on all of this cache (e.g. from valid.json) instead")
    data.add_argument(
        "--test-size", type=int, help="images held out for evaluation (default: 50, or a fifth of a small set)"
    )
    data.add_argument("--seed", type=int, default=defaults.seed, help="split, batch order, flips and initialisation")
    data.add_argument("--augment", choices=AUGMENTS, default=defaults.augment, help="hflip: the tutorial's "
                      "flips; multiscale: flips, and each batch's short side drawn from 480-800 (by 32) scaled to "
                      "--min-size; lsj: flips, and large-scale jitter into a square of side --min-size")  # fmt: skip
    data.add_argument("--color-jitter", action="store_true", help="also change each image's brightness, contrast, "
                      "saturation and hue (the references' SSD ranges)")  # fmt: skip
    data.add_argument("--repeat-factor", type=float, help="repeat-factor sampling for rare classes (LVIS, "
                      "detectron2): images of classes in fewer than this fraction of the images come more often; "
                      "e.g. 0.1")  # fmt: skip
    model = parser.add_argument_group("model")
    model.add_argument("--task", choices=TASKS, help="segment: Mask R-CNN, boxes and masks (default); detect: "
                       "Faster R-CNN, boxes alone, the tutorial's first model")  # fmt: skip
    model.add_argument("--backbone", choices=BACKBONES, default=defaults.backbone)
    model.add_argument("--weights", default=defaults.weights, help="coco, none, or a state dict / lean checkpoint file")
    model.add_argument("--min-size", type=int, default=defaults.min_size)
    model.add_argument("--max-size", type=int, default=defaults.max_size)
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=defaults.epochs)
    schedule.add_argument("--max-iters", type=int, help="stop after this many iterations in all")
    schedule.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    schedule.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=defaults.optimizer,
        help="sgd (momentum 0.9) as the tutorial, or adamw",
    )
    schedule.add_argument("--lr", type=float, default=defaults.lr, help="for the total batch, all processes together")
    schedule.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    schedule.add_argument(
        "--lr-step-epochs", type=int, default=defaults.lr_step_epochs, help="lr x 0.1 every this many epochs"
    )
    schedule.add_argument("--clip-grad", type=float, help="clip the gradient norm to this")
    schedule.add_argument("--ema", type=float, help="keep a moving average of the weights with this decay "
                          "(e.g. 0.999), updated after each step: evaluated and saved as the model")  # fmt: skip
    schedule.add_argument("--patience", type=int, help="stop after this many evaluations without a better main AP "
                          "(segm, or bbox for --task detect); best.pt keeps the best")  # fmt: skip
    speed = parser.add_argument_group("speed (each default follows a measurement: docs/performance.md)")
    add_device_argument(speed)
    speed.add_argument("--amp", choices=list(AMP), help="default: bf16 where the hardware computes in it, else off")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="default: on where bf16 is (CUDA, CPUs with bf16 hardware), else off")  # fmt: skip
    speed.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE,
                       help="compile the backbone: inductor (the flag alone), cudagraphs (dynamo's backend), or "
                            "graphs (backbone and RPN head recorded as CUDA graphs per canvas at start-up); "
                            "default: off")  # fmt: skip
    speed.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="run eager")
    speed.add_argument("--canvas-levels", type=int, help="side lengths per axis that batches are padded to where "
                       "they are (CUDA, compiled): fewer shapes for cuDNN to choose kernels for, more padding; "
                       "default 4")  # fmt: skip
    speed.add_argument("--batched-heads", action=argparse.BooleanOptionalAction,
                       help="train the RPN and RoI heads over the batch at once, 3 host syncs a step (lean.heads); "
                            "default: off, as it has not paid at batch 2 (docs/performance.md)")  # fmt: skip
    speed.add_argument(
        "--sync-bn", action="store_true", help="synchronise BatchNorm across processes (where the backbone has it)"
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", type=Path, help="default: runs/<timestamp>")
    run_group.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    run_group.add_argument("--no-eval", action="store_true", help="skip the evaluation after each epoch")
    run_group.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="evaluate every this many epochs, and after the last",
    )
    run_group.add_argument("--log-every", type=int, default=defaults.log_every)
    run_group.add_argument("--tensorboard", action="store_true", help="also write the figures as TensorBoard "
                           "event files in OUT/tensorboard (needs tensorboard)")  # fmt: skip
    try:
        config = TrainConfig(**vars(parser.parse_args(argv)))
    except SettingError as error:
        parser.error(f"argument --{error.field.replace('_', '-')}: {error.problem}")
    if config.tensorboard and tensorboard_missing():
        parser.error(f"argument --tensorboard: needs tensorboard: {INSTALL_TENSORBOARD}")
    if config.resume and config.out is None:
        parser.error("argument --resume: needs --out, the run folder to continue")
    if config.out is not None and config.out.exists() and not config.out.is_dir():
        parser.error(f"argument --out: {config.out} is a file, not a folder")
    if config.out is not None and not config.resume and (config.out / "last.pt").exists():
        parser.error(f"argument --out: {config.out} holds a run already (last.pt); continue it with --resume, or "
                     "train afresh into another --out")  # fmt: skip
    if config.resume:
        config = resumed(config, given_flags(parser, argv))
    check_device(parser, config.device)
    return config


if __name__ == "__main__":
    run(main)
