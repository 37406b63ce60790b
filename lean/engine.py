"""One epoch of training: the step, and the loop that feeds it from the loader until the epoch ends, the
run's last iteration comes, or a signal asks it to stop."""

import signal
from dataclasses import dataclass

import torch

from lean.ema import WeightsEMA
from lean.internals import BatchNorm

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class RunState:
    """What a step updates and a checkpoint saves, besides the RNG."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightsEMA | None = None


def train_step(model, images, targets, optimizer, scheduler, scaler, amp_dtype, clip_norm=None):
    """images/targets -> loss dict -> sum -> backward -> clip -> step; returns the losses detached (their sum
    first) and their names."""
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


@torch.no_grad()
def validation_losses(model, loader, amp_dtype, seed=0):
    """{"val_loss": their sum, "val_loss_NAME": each}: the model's training losses on the loader's images, the mean
    over images. No gradient, no statistic changed (BatchNorm runs on its running statistics, as in evaluation),
    and the run's random state untouched (the heads sample their regions from `seed`, in a fork of it), so a
    run that measures them resumes exactly as one that does not."""
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.eval()
    sums, count = {}, 0
    cuda = [loader.device] if loader.device.type == "cuda" else []
    # Eager, as prediction runs: compiled, each held-out image's shape would be one more graph.
    with torch.random.fork_rng(devices=cuda), torch.compiler.set_stance("force_eager"):
        torch.manual_seed(seed)
        for images, targets in loader:
            with torch.autocast(loader.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(images, targets)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.float() * len(images)
            count += len(images)
    model.train(was_training)
    means = dict(zip(sums, (torch.stack(list(sums.values())) / count).tolist()))  # one read from the device
    return {"val_loss": sum(means.values()), **{f"val_{name}": value for name, value in means.items()}}


class StopSignals:
    """While entered, SIGINT and SIGTERM ask the run to stop after the step in flight (`received` says which);
    a second one ends it at once."""

    def __enter__(self):
        self.received = None
        self.previous = {signum: signal.signal(signum, self._request) for signum in EXIT_SIGNAL}
        return self

    def _request(self, signum, _frame):
        self.received = self.received or signum
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *_):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def exit_status(self):
        return EXIT_SIGNAL[self.received]


def train_one_epoch(
    model, run, amp_dtype, clip_norm, loader, epoch, iteration, total_iterations, monitor, log, stop, augment=None
):
    """Train `model` (run.model, or its DDP wrapper) on the loader's epoch, from its start batch, with run's
    optimizer, scheduler and scaler, and `augment` (lean.augment.Augment) if given, until the epoch ends,
    `total_iterations` is reached, or `stop` receives a signal; returns the iteration reached."""
    monitor.new_epoch()
    for batch_index, (images, targets) in enumerate(loader, start=loader.start_batch):
        if augment is not None:
            images, targets = augment.before_step(run.model.transform, images, targets, epoch, batch_index)
        losses, names = train_step(
            model, images, targets, run.optimizer, run.scheduler, run.scaler, amp_dtype, clip_norm
        )
        if augment is not None:
            augment.after_step(run.model.transform)
        if run.ema is not None:
            run.ema.update()
        iteration += 1
        log.window(monitor.add(epoch, batch_index, iteration, losses, names))
        if stop.received:
            log.window(monitor.flush(epoch, batch_index, names))
            break
        if iteration >= total_iterations:
            break
    return iteration
