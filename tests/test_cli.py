"""Every command's bad arguments and unwritable outputs: one line, a non-zero exit, checked before any work."""

import signal
import subprocess
import sys

import pytest
import torch

from lean.cache.command import main as cache_main
from lean.evaluate import main as evaluate_main
from lean.predict import main as predict_main
from lean.train import main as train_main
from tests.conftest import QUICK, build_writing, cli, foreground_ctrl_c, one_line, wait_for


def test_numeric_arguments_of_build_and_predict_are_checked_too(run_dir, tmp_path, capsys):
    status, _, stderr = cli(
        cache_main, ["build", "--source", "synthetic", "--seed=-1", "--out", str(tmp_path / "c.h5")], capsys
    )
    assert one_line(status, stderr, "--seed")
    argv = ["x.png", "--checkpoint", str(run_dir / "last.pt"), "--score-thresh", "2"]
    status, _, stderr = cli(predict_main, argv, capsys)
    assert one_line(status, stderr, "--score-thresh")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_an_empty_or_foreign_checkpoint_is_one_line_everywhere(tiny, tmp_path, content, capsys):
    bad = tmp_path / "run" / "last.pt"
    bad.parent.mkdir()
    if content is None:
        torch.save({"something": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)
    resume = ["--cache", str(tiny), *QUICK, "--out", str(bad.parent), "--resume"]
    for main, argv in ((train_main, resume), (evaluate_main, ["--checkpoint", str(bad), "--device", "cpu"]),
                       (predict_main, ["x.png", "--checkpoint", str(bad), "--device", "cpu"])):  # fmt: skip
        status, _, stderr = cli(main, argv, capsys)
        assert one_line(status, stderr, str(bad)), stderr
    status, _, stderr = cli(
        train_main, ["--cache", str(tiny), *QUICK, "--weights", str(bad), "--out", str(tmp_path / "w")], capsys
    )
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "--weights" in stderr, stderr


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(tiny, run_dir, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    status, _, stderr = cli(train_main, ["--cache", str(tiny), *QUICK, "--out", str(afile)], capsys)
    assert one_line(status, stderr, "is a file")
    status, _, stderr = cli(
        predict_main, ["x.png", "--checkpoint", str(run_dir / "last.pt"), "--out", str(afile)], capsys
    )
    assert one_line(status, stderr, "is a file")
    evaluated = []
    monkeypatch.setattr("lean.evaluate.predict_split", lambda *args, **kwargs: evaluated.append(args))
    argv = ["--checkpoint", str(run_dir / "last.pt"), "--device", "cpu", "--json", str(tmp_path / "no" / "s.json")]
    status, _, stderr = cli(evaluate_main, argv, capsys)
    assert one_line(status, stderr, "--json") and not evaluated  # refused before evaluating


def _until_importing(process, package):
    """Read the -X importtime lines of `process` until a module of `package` has been imported."""
    return any(line.rpartition("|")[2].strip().startswith(f"{package}.") for line in process.stderr)


@pytest.mark.parametrize("when", ["torch loading", "building"])
def test_ctrl_c_while_the_build_command_starts_is_one_line(tmp_path, when):
    out = tmp_path / "c.h5"
    timing = ["-X", "importtime"] if when == "torch loading" else []  # each import as a line on stderr
    command = [sys.executable, *timing, "-m", "lean.cache", "build", "--source", "synthetic",
               "--num-images", "3000", "--workers", "2", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=foreground_ctrl_c
    )
    if when == "torch loading":  # the first of torch's modules is in: torch itself is loading
        assert _until_importing(process, "torch")
    else:
        assert wait_for(build_writing(tmp_path, out.name))
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr, stderr[-2000:]
