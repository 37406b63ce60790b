"""Process-wide speed settings: made by the entry points, and what they buy."""

import torch

from lean.loader import Loader
from lean.speed import Speed, tune_for_speed


def test_training_has_glibc_keep_freed_batches_and_a_loader_leaves_the_process_alone(cache, monkeypatch):
    import lean.speed
    import lean.train

    calls = []
    monkeypatch.setattr("lean.speed.keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr("lean.train.train", lambda *args: 0)
    Loader(cache, device="cpu")
    assert calls == []  # a process-wide setting: the entry point's to make, in plain view
    assert lean.train.main(["--device", "cpu"]) == 0
    assert calls == [1]
    monkeypatch.undo()
    assert lean.speed.keep_freed_memory()  # glibc accepted the settings (this machine runs glibc)


def test_freed_blocks_past_glibcs_mapping_threshold_are_reused_not_faulted_in_again():
    import resource

    import lean.speed

    assert lean.speed.keep_freed_memory()
    floats = 64 << 18  # 64 MiB of float32: past the 32 MiB that glibc would otherwise map afresh each time
    pages = floats * 4 // 4096

    def step():  # a large tensor written and freed, with a small one made after it as real code does
        large, small = torch.ones(floats), torch.zeros(100)
        del large
        return small

    for _ in range(12):  # the heap settles: a few blocks' worth of free space stays for reuse
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < pages, faults  # mapped afresh, each of the 5 would fault in all its pages again


def test_the_heads_are_torchvisions_unless_batched_heads_are_asked_for():
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from lean.heads import BatchedRPN
    from lean.model import ModelSpec, create_model

    assert not Speed.for_device(torch.device("cpu")).batched_heads  # measured: docs/performance.md
    model = create_model(ModelSpec("mobilenet_v3_fpn", pretrained=False))
    assert type(tune_for_speed(model, Speed()).rpn) is RegionProposalNetwork
    assert isinstance(tune_for_speed(model, Speed(batched_heads=True)).rpn, BatchedRPN)
