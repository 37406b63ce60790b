"""bench.syncs counts on the CPU the host syncs a GPU would make, and on a GPU what set_sync_debug_mode sees."""

import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision

from bench.syncs import count_syncs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _syncing_snippets(device):
    """(name, function) pairs, each making exactly one sync on a GPU."""
    x = torch.rand(16, device=device)
    boxes = torch.rand(6, 4, device=device).cumsum(1)
    return [
        ("item", lambda: x.sum().item()),
        ("if on a tensor", lambda: bool((x > 2).any())),
        ("nonzero", lambda: torch.nonzero(x > 0.5)),
        ("where with one argument", lambda: torch.where(x > 0.5)),
        ("boolean index", lambda: x[x > 0.5]),
        ("unique", lambda: torch.unique(x)),
        ("tolist", lambda: x.tolist()),
        ("cpu", lambda: x.cpu()),
        ("a tensor from host data", lambda: torch.tensor([1.0, 2.0], device=device)),
        ("new_tensor", lambda: x.new_tensor([1.0, 2.0])),
        ("a host tensor moved to the device", lambda: torch.arange(3).to(x.device)),
        ("repeat_interleave", lambda: torch.repeat_interleave(torch.ones(3, dtype=torch.long, device=device))),
        ("nms", lambda: torchvision.ops.nms(boxes, torch.rand(6, device=device), 0.5)),
    ]


def _free_snippets(device):
    """(name, function) pairs that make no sync on a GPU."""
    x = torch.rand(16, device=device)
    return [
        ("arithmetic", lambda: (x * 2 + 1).sigmoid()),
        ("masked_fill", lambda: x.masked_fill(x > 0.5, 0.0)),
        ("a boolean mask set to a number", lambda: x.clone().__setitem__(x > 0.5, 0.0)),
        ("nonzero_static", lambda: torch.nonzero_static(x > 0.5, size=4)),
        ("a long index", lambda: x[torch.arange(3, device=device)]),
        ("a host tensor read", lambda: int(torch.empty(1).uniform_(0.0, 3.0).item())),
        ("randperm", lambda: torch.randperm(10, device=device)),
    ]


@pytest.mark.parametrize(
    ("snippets", "index", "expected"),
    [(_syncing_snippets, k, 1) for k in range(13)] + [(_free_snippets, k, 0) for k in range(7)],
)
def test_on_the_cpu_each_operation_counts_the_syncs_a_gpu_would_make(snippets, index, expected):
    name, snippet = snippets("cpu")[index]
    with count_syncs() as syncs:
        snippet()
    assert syncs.total == expected, (name, syncs.by_op)


def test_a_sync_is_put_down_to_the_line_outside_torch_that_asked():
    x, boxes = torch.rand(4), torch.rand(3, 4).cumsum(1)  # made before counting: the model's inputs, say
    with count_syncs() as syncs:
        x.sum().item()
        asked = sys._getframe().f_lineno - 1
        torchvision.ops.nms(boxes, x[:3], 0.5)
    mine, torchvisions = syncs.by_line
    assert mine == f"tests/test_syncs.py:{asked}" and torchvisions.startswith("ops/boxes.py:")


def test_a_backward_through_a_boolean_index_counts_its_scatter():
    x = torch.rand(8, requires_grad=True)
    picked = x[x > 0.5]
    with count_syncs() as syncs:
        picked.sum().backward()
    assert syncs.by_op == {"aten::index_put": 1}


def _debug_mode_sites(function):
    """{'folder/file:line': syncs} where torch.cuda.set_sync_debug_mode warned while `function` ran. It can warn
    twice for one wait (an item() both copies and synchronises): compare where, and whether, not how often."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in caught
             if "synchroniz" in str(w.message)]  # fmt: skip
    return Counter(sites)


@CUDA
def test_on_a_gpu_the_counter_agrees_with_sync_debug_mode_operation_by_operation():
    for name, snippet in _syncing_snippets("cuda") + _free_snippets("cuda"):
        if name == "nms":  # torchvision's CUDA NMS reads its kept count inside its own C++ (a masked_select), where
            continue  # the debug mode gave no warning on an H200 (2026-11-30): it waits all the same
        torch.cuda.synchronize()
        with count_syncs() as syncs:
            snippet()
        torch.cuda.synchronize()
        assert bool(syncs.total) == bool(_debug_mode_sites(snippet)), name


@CUDA
def test_on_a_gpu_a_training_step_syncs_where_counted_and_at_most_three_times():
    from lean.heads import batch_heads
    from lean.model import ModelSpec, create_model
    from tests.test_model import _first_batch

    torch.manual_seed(0)
    model = batch_heads(create_model(ModelSpec("resnet50_fpn", min_size=160, max_size=256), device="cuda")).train()
    images, targets = _first_batch("cuda")

    def step():
        sum(model(images, targets).values()).backward()

    step()  # constants made, NMS's rounds settled
    torch.cuda.synchronize()
    with count_syncs() as syncs:
        step()
    torch.cuda.synchronize()
    assert syncs.total <= 3, syncs.by_line
    assert set(_debug_mode_sites(step)) == set(syncs.by_line)
