"""The train section: the tutorial's training step against lean.train's, from the same weights, side by side: its
Mask R-CNN against lean's segment model, and its Faster R-CNN (the tutorial's first model) against lean's detect."""

import dataclasses
import statistics

import torch

from bench.common import copied, epochs, scratch_cache, time_steps
from bench.seed_pipeline import seed_detector, seed_loader, seed_model, seed_step
from lean.engine import train_step
from lean.graphs import capture_graphs
from lean.heads import use_fixed_shapes
from lean.loader import Loader
from lean.model import ModelSpec, create_model
from lean.optim import make_optimizer, make_scheduler
from lean.speed import Speed

SEED_MODELS = {"segment": seed_model, "detect": seed_detector}  # the tutorial's Mask R-CNN and Faster R-CNN


def seed_training(root, device, min_size, max_size, task="segment"):
    """(step, batches, weights): the tutorial's step (torchvision's resnet50_fpn Mask R-CNN, or Faster R-CNN for
    `task` detect, eager fp32, SGD at lr 0) from a fixed random init, its Dataset + DataLoader's batches without
    end (masks and all, as the tutorial's Dataset makes them for either model), and the init's weights."""
    torch.manual_seed(0)
    model = SEED_MODELS[task](min_size, max_size).to(device).train()
    weights = copied(model.state_dict())
    optimizer = make_optimizer(model, 0.0, fused=False)  # the tutorial's SGD, as torch configures it by default

    def step(batch):
        seed_step(model, optimizer, *batch, device)

    return step, epochs(lambda _: seed_loader(root, batch_size=2, workers=2, shuffle=True, train=True)), weights


def lean_training(
    cache, device, min_size, max_size, speed=None, weights=None, lr=0.005, batch_size=2, fused=None, task="segment",
    fixed_shapes=None,
):  # fmt: skip
    """(step, batches): lean.train's step fine-tuning torchvision's resnet50_fpn (a Mask R-CNN, or for `task`
    detect a Faster R-CNN) from `weights` (a state dict; if not given, the seed model's fixed random init) with
    `speed` (default: lean's for the device), and the Loader's batches without end. `fixed_shapes`: the heads'
    path where the speed has batched heads (lean.heads.use_fixed_shapes; None: by device)."""
    if weights is None:
        torch.manual_seed(0)
        weights = SEED_MODELS[task](min_size, max_size).state_dict()
    speed = speed or Speed.for_device(device)
    spec = ModelSpec("resnet50_fpn", ("person",), min_size, max_size, task=task)  # the fine-tuning layout
    model = create_model(spec, copied(weights), speed, device).train()  # each variant its own tensors
    model = use_fixed_shapes(model, fixed_shapes) if speed.batched_heads else model
    if speed.compile == "graphs":
        capture_graphs(model, batch_size, speed.amp)
    optimizer = make_optimizer(model, lr, fused=fused)
    loader = Loader(cache, batch_size=batch_size, device=device, dtype=torch.uint8, masks=spec.masks)
    scheduler = make_scheduler(optimizer, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=speed.amp == torch.float16)

    def step(batch):
        train_step(model, *batch, optimizer, scheduler, scaler, speed.amp)

    def batches(epoch):
        loader.set_epoch(epoch)
        return loader

    return step, epochs(batches)


def lean_variants(device, inductor):
    """{label: (Speed, fused SGD or None for the default)}: lean's default for the device first, then the same
    step with its heads the other way (batched or torchvision's), and on CUDA with the backbone replayed as CUDA
    graphs (dynamo's backend, and lean.graphs' per canvas with the RPN head); with `inductor`, the backbone
    compiled by inductor. (Canvases and fused SGD were measured once on an H100, docs/performance-log.md, and
    are defaults.)"""
    default = Speed.for_device(device)
    other_heads = dataclasses.replace(default, batched_heads=not default.batched_heads)
    variants = {f"lean's default ({default})": (default, None)}
    variants["batched heads" if other_heads.batched_heads else "torchvision's heads"] = (other_heads, None)
    if device.type == "cuda":
        variants["CUDA graphs (--compile cudagraphs)"] = (dataclasses.replace(default, compile="cudagraphs"), None)
        variants["graphs per canvas (--compile graphs)"] = (dataclasses.replace(default, compile="graphs"), None)
    if inductor:
        variants["inductor"] = (dataclasses.replace(default, compile="inductor", canvases=True), None)
    return variants


def train_section(root, steps, warmup, min_size, max_size, device, inductor, scratch, tasks=("segment", "detect")):
    """Steady-state images/s, the tutorial's pipeline (seed data path, eager fp32 Mask R-CNN) against lean.train's
    step in each of lean_variants, and for `tasks` holding detect, its Faster R-CNN against lean's detect step
    with lean's defaults; yields each row as soon as it is measured.

    Both fine-tune torchvision's resnet50_fpn Mask R-CNN in the layout its COCO weights give it, from the
    same random weights, with SGD at learning rate 0 (a real step's work on weights that stay put, so step
    costs do not drift), batch 2, `warmup` untimed then `steps` timed steps; a step's time runs from asking
    for its batch to the device finishing it. A compiled variant's compile time is the time its steps took
    over their median, warm-up and timed steps together (a new canvas compiles when first met).
    docs/performance.md has the method's reasons.
    """
    for task in tasks:
        yield from _task_rows(root, steps, warmup, min_size, max_size, device, inductor, scratch, task)


def _task_rows(root, steps, warmup, min_size, max_size, device, inductor, scratch, task):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seed_step, seed_batches, weights = seed_training(root, device, min_size, max_size, task)
    seed_waits, seed_totals = time_steps(seed_step, seed_batches, warmup + steps, sync)
    seed_rate = 2 / statistics.median(seed_totals[warmup:])
    seed_wait = 100 * sum(seed_waits[warmup:]) / sum(seed_totals[warmup:])
    del seed_step, seed_batches

    cache = scratch_cache(root, scratch)
    variants = lean_variants(device, inductor)
    if task == "detect":  # lean's defaults and torchvision's heads: the other variants' figures are the segment model's
        variants = dict(list(variants.items())[:2])
    model = "Mask R-CNN" if task == "segment" else "Faster R-CNN"
    for label, (speed, fused) in variants.items():
        lean_step, lean_batches = lean_training(
            cache, device, min_size, max_size, speed, weights, lr=0.0, fused=fused, task=task
        )
        waits, totals = time_steps(lean_step, lean_batches, warmup + steps, sync)
        median = statistics.median(totals[warmup:])
        rate = 2 / median
        where = f"{device.type}, {min_size}/{max_size} px"
        yield (
            "train",
            f"{model} images/s, median of {steps} steps ({where}; {label})",
            f"seed Dataset + eager fp32 {model}",
            seed_rate,
            rate,
            rate / seed_rate,
        )
        wait = 100 * sum(waits[warmup:]) / sum(totals[warmup:])
        yield (
            "train",
            f"{model} waiting for data, % of step time ({label})",
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
