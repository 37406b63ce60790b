"""The tutorial's optimizer and learning-rate schedule.

By default 10 epochs of batch 2, SGD (lr 0.005, momentum 0.9, weight decay 5e-4), a linear warmup from
lr/1000 over the first min(1000, iterations per epoch - 1) iterations, and lr x 0.1 every 3 epochs,
as one per-iteration LambdaLR, so a resumed run picks the schedule up exactly.
"""

import torch

OPTIMIZERS = ("sgd", "adamw")


def lr_factor(iteration, iterations_per_epoch, step_epochs=3, gamma=0.1, warmup_factor=1e-3, warmup_limit=1000):
    """The multiple of the base learning rate at a global iteration: the tutorial's warmup times its StepLR."""
    epoch = iteration // iterations_per_epoch
    factor = gamma ** (epoch // step_epochs)
    warmup_iterations = min(warmup_limit, iterations_per_epoch - 1)
    if epoch == 0 and iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def make_optimizer(model, lr, kind="sgd", weight_decay=5e-4, fused=None):
    """The tutorial's SGD (momentum 0.9), or AdamW, which trains a network from scratch in far fewer steps.

    fused (default: where the parameters are on CUDA): one kernel updates every parameter.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = all(p.device.type == "cuda" for p in parameters)
    if kind == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay, fused=fused or None)


def make_scheduler(optimizer, iterations_per_epoch, step_epochs=3):
    """Stepped once per iteration, so its state is the global iteration and resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda iteration: lr_factor(iteration, iterations_per_epoch, step_epochs)
    )
