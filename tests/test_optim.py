"""The tutorial's optimizer schedule."""

import pytest
import torch

from lean.optim import lr_factor, make_scheduler


@pytest.mark.parametrize(
    "iteration, per_epoch, expected",
    [
        (0, 60, 1e-3),  # warmup starts at lr / 1000
        (30, 60, 1e-3 * (1 - 30 / 59) + 30 / 59),  # linear over min(1000, 60 - 1) iterations
        (59, 60, 1.0),  # warmup done
        (60, 60, 1.0),  # epoch 1
        (179, 60, 1.0),  # epoch 2, last iteration
        (180, 60, 0.1),  # epoch 3: first step down
        (360, 60, 0.01),  # epoch 6
        (500, 2000, 1e-3 * 0.5 + 0.5),  # warmup capped at 1000 iterations
        (1000, 2000, 1.0),
    ],
)
def test_schedule_is_the_tutorials(iteration, per_epoch, expected):
    assert lr_factor(iteration, per_epoch) == pytest.approx(expected)


def test_scheduler_follows_the_factor_per_iteration():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.005)
    scheduler = make_scheduler(optimizer, 10)
    for iteration in range(40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005 * lr_factor(iteration, 10))
        optimizer.step()
        scheduler.step()
