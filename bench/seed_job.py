"""python -m bench.seed_job: the tutorial's whole job, timed, as the baseline for `python -m lean.train`.

The tutorial's script, written here from its description: 50 random test images, the rest for training
with flips; batches of 2 from 4 DataLoader workers, test images one at a time; SGD (lr 0.005, momentum
0.9, weight decay 5e-4) with the references' warmup in the first epoch and the rate divided by 10 every
3 epochs; each step reads its loss (the references' check that it is finite, made here after the step);
after every epoch the references' evaluation (bench.seed_pipeline.seed_evaluate). The model is
bench.seed_pipeline.seed_model_from_scratch, as `lean.train --weights none` builds it.
"""

import math
import time
from pathlib import Path

import torch

from bench.seed_pipeline import SeedPennFudan, collate, seed_evaluate, seed_model_from_scratch, seed_step
from lean.cli import Parser, add_device_argument, check_device, run
from lean.optim import lr_factor
from lean.pennfudan import default_root


def loaders(root, test_size, seed):
    """The tutorial's (train, test) DataLoaders and the test images' indices."""
    order = torch.randperm(len(SeedPennFudan(root)), generator=torch.Generator().manual_seed(seed)).tolist()
    train = torch.utils.data.Subset(SeedPennFudan(root, train=True), order[:-test_size])
    test_indices = order[-test_size:]
    test = torch.utils.data.Subset(SeedPennFudan(root), test_indices)
    return (
        torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, num_workers=4, collate_fn=collate),
        torch.utils.data.DataLoader(test, batch_size=1, shuffle=False, num_workers=4, collate_fn=collate),
        test_indices,
    )


def train_one_epoch(model, optimizer, scheduler, loader, device):
    model.train()
    for images, targets in loader:
        loss = seed_step(model, optimizer, images, targets, device).item()
        if not math.isfinite(loss):
            raise SystemExit(f"loss is {loss}, stopping training")
        scheduler.step()


@torch.inference_mode()
def evaluate(model, loader, test_indices, root, device):
    model.eval()
    predictions = []
    for images, _targets in loader:
        outputs = model([image.to(device) for image in images])
        predictions += [{key: value.cpu() for key, value in output.items()} for output in outputs]
    return seed_evaluate(root, test_indices, predictions)


def parse_args(argv):
    parser = Parser(prog="python -m bench.seed_job", description=__doc__)
    parser.add_argument("--root", type=Path, help="PennFudan folder (default: as lean.cache build finds it)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    root = default_root(args.root, advice="pass --root DIR with a PennFudan folder")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train_loader, test_loader, test_indices = loaders(root, 50, args.seed)
    model = seed_model_from_scratch(args.min_size, args.max_size).to(device)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.005, momentum=0.9, weight_decay=0.0005)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, steps))
    for epoch in range(args.epochs):
        train_one_epoch(model, optimizer, scheduler, train_loader, device)
        stats = evaluate(model, test_loader, test_indices, root, device)
        print(f"epoch {epoch + 1}/{args.epochs}: bbox AP {stats['bbox'][0]:.3f}, segm AP {stats['segm'][0]:.3f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    print(f"seed job: {args.epochs} epochs with evaluation after each in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(main)
