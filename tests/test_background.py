"""Writing off the training thread: jobs in order, failures raised where the run waits, snapshots that do not move."""

import threading

import pytest
import torch

from lean.background import Writer, snapshot
from lean.errors import LeanError


def test_jobs_run_in_order_off_the_calling_thread_and_all_are_done_on_exit():
    seen = []
    with Writer() as writer:
        for k in range(5):
            writer.submit(lambda k=k: seen.append((k, threading.current_thread().name)))
    assert [k for k, _ in seen] == list(range(5))
    assert all(name.startswith("lean-writer") for _, name in seen)


def test_a_jobs_failure_is_raised_by_the_next_wait():
    writer = Writer()
    writer.submit(lambda: (_ for _ in ()).throw(LeanError("runs/x/last.pt: cannot write (disk full)")))
    with pytest.raises(LeanError, match="disk full"):
        writer.wait()
    writer.wait()  # reported once
    with pytest.raises(LeanError, match="again"), writer:
        writer.submit(lambda: (_ for _ in ()).throw(LeanError("again")))


def test_a_snapshot_keeps_the_values_of_the_moment_it_was_taken():
    weights = torch.arange(6.0).reshape(2, 3).contiguous(memory_format=torch.contiguous_format)
    state = {"model": {"w": weights}, "rng": [torch.tensor([1, 2])], "epoch": 3, "names": ("a", "b")}
    copied = snapshot(state)
    weights.add_(100)
    assert copied["model"]["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and copied["epoch"] == 3
    assert copied["rng"][0].tolist() == [1, 2] and copied["names"] == ("a", "b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_snapshot_lands_in_pinned_host_memory():
    weights = torch.randn(64, 3, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    copied = snapshot({"w": weights})["w"]
    assert copied.device.type == "cpu" and copied.is_pinned() and torch.equal(copied, weights.cpu())


def test_a_checkpoint_written_in_the_background_holds_what_one_written_in_place_holds(tmp_path):
    from lean.checkpoint import Checkpointer, Position, load
    from lean.config import TrainConfig
    from lean.engine import RunState
    from lean.model import ModelSpec

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to save
    run = RunState(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), torch.amp.GradScaler("cpu"))
    saved = {}
    for name, writer in (("in place", None), ("background", Writer())):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        checkpointer = Checkpointer(folder, run, ModelSpec(), TrainConfig(), "f" * 64, writer=writer)
        torch.manual_seed(0)
        checkpointer.save(Position(1, 0, 5), ap=0.5)
        if writer:
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on while the file is written
            writer.wait()
        saved[name] = load(folder / "last.pt")
        assert (folder / "best.pt").read_bytes() == (folder / "last.pt").read_bytes()
    for key in ("model", "optimizer", "rng"):
        torch.testing.assert_close(saved["background"][key], saved["in place"][key], rtol=0, atol=0)
