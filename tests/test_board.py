"""TensorBoard: a run's records as event files, the same scalars as metrics.jsonl."""

import pytest

import lean.train
from lean.board import scalars
from tests.conftest import SMALL, one_line, run_train


def test_every_number_of_every_record_becomes_a_scalar_at_its_step():
    assert scalars({"epoch": 0, "iteration": 7, "loss": 1.5, "loss_mask": 0.5}) == [("loss", 1.5, 7),
                                                                                  ("loss_mask", 0.5, 7)]  # fmt: skip
    stats = [0.1 * k for k in range(12)]
    evaluation = scalars({"epoch": 3, "bbox": stats})
    assert evaluation[0] == ("bbox/AP", 0.0, 3) and evaluation[-1] == ("bbox/ARl", stats[-1], 3)
    per_class = scalars({"epoch": 3, "per_class": {"segm": {"disc": {"AP": 0.4, "AP50": 0.7}}}})
    assert per_class == [("segm_per_class/disc/AP", 0.4, 3), ("segm_per_class/disc/AP50", 0.7, 3)]
    assert scalars({"epoch": 1, "iteration": 9, "val_loss": 2.0}) == [("val_loss", 2.0, 9)]


def test_a_run_with_tensorboard_writes_its_losses_and_ap_as_event_files(tiny, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--max-iters", "2", "--log-every", "1"]
    status, _, _ = run_train([*argv, "--tensorboard", "--out", str(tmp_path)], capsys)
    assert status == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "val_loss", "bbox/AP", "segm/AP", "segm_per_class/person/AP"} <= tags
    assert [event.step for event in events.Scalars("loss")] == [1, 2]


def test_without_tensorboard_the_flag_is_one_line_saying_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(lean.train, "tensorboard_missing", lambda: True)
    with pytest.raises(SystemExit):
        lean.train.parse_args(["--tensorboard"])
    assert one_line(2, capsys.readouterr().err, "--tensorboard", "pip install tensorboard")
