"""The benchmark's commands refuse what they cannot do as lean's own do: one line, a non-zero exit."""

import torch

from bench import seed_job
from tests.conftest import cli


def test_the_tutorial_job_asked_for_cuda_where_torch_sees_none_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, stderr = cli(seed_job.main, ["--device", "cuda"], capsys)
    assert status == 2 and "--device cuda: torch sees no CUDA device" in stderr and len(stderr.splitlines()) == 1
