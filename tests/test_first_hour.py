"""What a user sees in a first hour: curves as a picture, readable prediction pictures, progress on every long
job, and a log without warnings."""

import builtins

import pytest
from PIL import Image

from lean.evaluate import main as evaluate_main
from lean.plot import main as plot_main
from lean.predict import main as predict_main
from lean.synthetic import SyntheticSource
from lean.train import main as train_main
from tests.conftest import SMALL, cli, exit_status

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny, run_dir, tmp_path_factory):
    """The suite's run (seed 0) and one more at seed 1, the same otherwise."""
    out = tmp_path_factory.mktemp("run1")
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--epochs", "2", "--seed", "1", "--out", str(out)]
    assert exit_status(train_main, argv) == 0
    return [run_dir, out]


def test_every_run_draws_its_curves(two_runs):
    for run in two_runs:
        assert (run / "curves.png").read_bytes().startswith(PNG)
        assert Image.open(run / "curves.png").size[0] > 800


def test_several_runs_are_compared_on_one_figure(two_runs, tmp_path, capsys):
    status, stdout, _ = cli(plot_main, [*map(str, two_runs), "--out", str(tmp_path / "both.png")], capsys)
    assert status == 0 and (tmp_path / "both.png").read_bytes().startswith(PNG) and "both.png" in stdout


def test_without_matplotlib_one_line_says_how_to_get_it_and_training_goes_on(tiny, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-eval", "--epochs", "2", "--out", str(tmp_path)]
    status, stdout, _ = cli(train_main, argv, capsys)
    assert status == 0 and stdout.count("no curves.png") == 1 and "pip install -e '.[plot]'" in stdout
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "curves.png").exists()


def test_the_start_line_names_the_precision_and_the_cpu_log_has_no_device_memory(two_runs, tiny, tmp_path, capsys):
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-eval", "--max-iters", "1", "--amp", "off"]
    status, stdout, _ = cli(train_main, [*argv, "--out", str(tmp_path)], capsys)
    assert status == 0 and "amp off," in stdout and "amp None" not in stdout and "max mem" not in stdout


def test_evaluation_shows_its_progress(two_runs, capsys):
    status, _, stderr = cli(evaluate_main, ["--checkpoint", str(two_runs[0] / "last.pt"), "--device", "cpu"], capsys)
    assert status == 0 and "evaluate: 2/2" in stderr and "images/s" in stderr


def test_predict_takes_folders_and_patterns_in_batches_with_progress(two_runs, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for k in range(6):
        Image.fromarray(SyntheticSource(12, seed=6).load(k).pixels).save(folder / f"a{k}.png")
        Image.fromarray(SyntheticSource(12, seed=6).load(6 + k).pixels).save(folder / "more" / f"b{k}.jpg")
    (folder / "notes.txt").write_text("not an image")
    argv = [str(folder), str(folder / "more" / "*.jpg"), "--checkpoint", str(two_runs[0] / "last.pt"),
            "--out", str(tmp_path / "out"), "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 0 and len(stdout.splitlines()) == 12
    assert len(list((tmp_path / "out").iterdir())) == 12
    assert "predict: 12/12" in stderr and "images/s" in stderr
