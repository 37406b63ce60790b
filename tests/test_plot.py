"""Curves: a view of a run that never stops it, drawn from whatever lines of metrics.jsonl are lean's records."""

import json

from lean.plot import main as plot_main
from lean.plot import read_metrics
from lean.train import main as train_main
from tests.conftest import QUICK, cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_lines_that_are_not_records_are_skipped_and_counted(run_dir, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    good = (run_dir / "metrics.jsonl").read_bytes()
    bad = [b"3", b'{"loss": 1.0}', b'{"iteration": 4, "loss": "high"}', b'{"epoch": 0, "bbox": []}', b"\xff\xfe{"]
    (folder / "metrics.jsonl").write_bytes(good + b"\n".join(bad) + b"\n")
    losses, _, precision, skipped = read_metrics(folder)
    assert skipped == len(bad) and losses and precision["bbox"]
    status, stdout, stderr = cli(plot_main, [str(folder)], capsys)
    assert status == 0 and f"skipped {len(bad)} lines" in stdout and not stderr
    assert (folder / "curves.png").read_bytes().startswith(PNG)


def test_each_evaluation_logs_the_validation_losses_and_the_curves_read_them(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [record for record in records if "val_loss" in record]
    assert [record["epoch"] for record in validation] == [0, 1]  # two epochs, evaluated after each
    assert all(record["val_loss"] > 0 and "val_loss_mask" in record for record in validation)
    losses, *_ = read_metrics(run_dir)
    assert [value for _, value in losses["val_loss"]] == [record["val_loss"] for record in validation]
    assert len(losses["loss"]) > len(losses["val_loss"])  # the training losses are still there, point by point


def test_a_killed_runs_half_line_neither_stops_the_resumed_run_nor_swallows_its_next_record(tiny, tmp_path, capsys):
    common = ["--cache", str(tiny), *QUICK, "--log-every", "1", "--out", str(tmp_path)]
    assert cli(train_main, [*common, "--max-iters", "1"], capsys)[0] == 0
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 0, "iter')  # the process died mid-write
    assert cli(train_main, [*common, "--max-iters", "2", "--resume"], capsys)[0] == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[-3] == '{"epoch": 0, "iter'
    assert json.loads(lines[-2])["iteration"] == 2  # the resumed run's first record, on a line of its own
    assert read_metrics(tmp_path)[3] == 1


def test_a_full_disk_under_the_metrics_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write: no space left on device
    status, _, stderr = cli(train_main, ["--cache", str(tiny), *QUICK, "--max-iters", "1", "--out", str(out)], capsys)
    assert status == 2 and "metrics.jsonl: cannot write" in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
