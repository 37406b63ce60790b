"""The benchmark's commands refuse what they cannot do as lean's own do: one line, a non-zero exit."""

import torch

from bench import seed_job
from tests.conftest import cli


def test_the_tutorial_job_asked_for_cuda_where_torch_sees_none_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, stderr = cli(seed_job.main, ["--device", "cuda"], capsys)
    assert status == 2 and "--device cuda: torch sees no CUDA device" in stderr and len(stderr.splitlines()) == 1


def test_offline_the_benchmark_names_what_it_takes_instead(monkeypatch, tmp_path, capsys):
    from bench import throughput

    monkeypatch.chdir(tmp_path)  # no data/PennFudanPed here
    monkeypatch.delenv("LEAN_PENNFUDAN", raising=False)
    monkeypatch.setattr("lean.download.PENNFUDAN_URL", "http://127.0.0.1:9/PennFudanPed.zip")  # nothing listens
    status, _, stderr = cli(throughput.main, ["--sections", "data", "--device", "cpu"], capsys)
    assert status == 2 and "cannot download" in stderr and "--sections coco" in stderr
    lines = stderr.strip().splitlines()  # the download announced, then why it failed
    assert "--source synthetic" not in stderr and len(lines) == 2 and lines[1].startswith("error: cannot download")
