"""Checkpoints: written whole, read back from any version, resumed exactly, one run per folder."""

import os

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from lean.cache import build
from lean.checkpoint import RunFolder, load_model, read_weights
from lean.evaluate import main as evaluate_main
from lean.model import ModelSpec, create_model
from lean.synthetic import SyntheticSource
from lean.train import main as train_main
from lean.train import parse_args
from tests.conftest import QUICK, SMALL, cli, one_line, run_train


@pytest.mark.parametrize("flag, value", [("--batch-size", "4"), ("--lr", "0.5"), ("--backbone", "resnet18_fpn"),
                                         ("--optimizer", "adamw"), ("--ema", "0.99"),
                                         ("--repeat-factor", "0.5"), ("--augment", "multiscale")])  # fmt: skip
def test_resume_refuses_a_setting_it_would_not_keep(run_dir, tiny, flag, value, capsys):
    argv = ["--cache", str(tiny), *QUICK, "--epochs", "2", "--out", str(run_dir), "--resume", flag, value]
    status, _, stderr = cli(train_main, argv, capsys)
    assert one_line(status, stderr, "--resume", flag), stderr


def test_resume_takes_the_runs_settings_and_the_flags_that_may_change(run_dir):
    config = parse_args(["--out", str(run_dir), "--resume", "--epochs", "5", "--log-every", "3"])
    assert config.backbone == "mobilenet_v3_fpn" and config.min_size == 96 and config.test_size == 2  # the run's
    assert config.epochs == 5 and config.log_every == 3 and config.resume


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(train_main, ["--cache", str(tiny), *QUICK, "--epochs", "1", "--out", str(out)], capsys)[0] == 0
    good = (out / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(state, path):  # as torch.save fails when the disk fills: part written, then an error
        real_save({"part": torch.zeros(10)}, path)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 59000000 vs 58999936")

    monkeypatch.setattr("lean.checkpoint.torch.save", full_disk)
    status, _, stderr = cli(
        train_main, ["--cache", str(tiny), *QUICK, "--epochs", "2", "--out", str(out), "--resume"], capsys
    )
    assert one_line(status, stderr, "last.pt", "cannot write", "kept")
    assert (out / "last.pt").read_bytes() == good and not list(out.glob(".*.tmp"))


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out):
        status, _, stderr = cli(
            train_main, ["--cache", str(tiny), *QUICK, "--max-iters", "1", "--out", str(out)], capsys
        )
    assert one_line(status, stderr, str(out), f"process {os.getpid()}")
    assert cli(train_main, ["--cache", str(tiny), *QUICK, "--max-iters", "1", "--out", str(out)], capsys)[0] == 0


def test_a_killed_runs_temporary_checkpoint_is_cleared_by_the_next(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.tmp").write_bytes(b"half a checkpoint")
    assert cli(train_main, ["--cache", str(tiny), *QUICK, "--max-iters", "1", "--out", str(out)], capsys)[0] == 0
    assert not (out / ".last.pt.tmp").exists() and (out / "last.pt").is_file()


def as_version_1(state):
    """What lean wrote before the checkpoint schema (2026-11-26): the command line's arguments as "args", no spec."""
    args = {**state["config"], "compile": False}
    return {key: value for key, value in state.items() if key not in ("format", "version", "model_spec", "config")} | {
        "args": args
    }


def test_a_run_is_evaluated_in_the_layout_it_trained_in(trained_run, tmp_path):
    _, run_dir = trained_run
    from_scratch, spec, _ = load_model(run_dir / "last.pt", "cpu")
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in from_scratch.modules()) and not spec.pretrained
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["model_spec"]["pretrained"] = True  # as if fine-tuned from weights in a file
    torch.save(state, tmp_path / "tuned.pt")
    tuned, _, _ = load_model(tmp_path / "tuned.pt", "cpu")
    assert any(isinstance(module, FrozenBatchNorm2d) for module in tuned.modules())
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in tuned.modules())


def _spec_field(state):
    state["model_spec"]["colour"] = "red"
    return "its model spec or settings cannot be read back (ModelSpec.__init__() got an unexpected keyword"


def _class_count(state):
    state["model_spec"]["class_names"] = ["a", "b"]
    return "its model spec or settings cannot be read back (2 class names but 1 category ids)"


def _setting_type(state):
    state["config"]["lr"] = "fast"
    return "its lr is 'fast', not float or int"


def _newer(state):
    state["version"] = 99
    return "a checkpoint of version 99; this lean reads versions 1 to 2"


@pytest.mark.parametrize("damage", [_spec_field, _class_count, _setting_type, _newer], ids=lambda f: f.__name__[1:])
def test_a_checkpoint_whose_spec_or_settings_cannot_be_read_back_is_one_line(trained_run, tmp_path, capsys, damage):
    _, run_dir = trained_run
    state = torch.load(run_dir / "last.pt", weights_only=True)
    reason = damage(state)
    torch.save(state, tmp_path / "damaged.pt")
    status, _, stderr = cli(evaluate_main, ["--checkpoint", str(tmp_path / "damaged.pt"), "--device", "cpu"], capsys)
    assert status == 2 and f"damaged.pt: {reason}" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_checkpoint_written_before_the_schema_still_evaluates_and_resumes(short_run, tmp_path, capsys):
    cache, run_dir = short_run
    old = as_version_1(torch.load(run_dir / "last.pt", weights_only=True))
    old["args"]["weights"] = str(run_dir / "last.pt")  # version 1 told the layout by this argument
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "last.pt")
    model, spec, config = load_model(tmp_path / "old" / "last.pt", "cpu")
    assert spec.backbone == "mobilenet_v3_fpn" and spec.class_names == ("person",) and spec.pretrained
    assert config.cache == cache and config.test_size == 2
    assert all(torch.equal(value, old["model"][key]) for key, value in model.state_dict().items())
    status, _, _ = cli(evaluate_main, ["--checkpoint", str(tmp_path / "old" / "last.pt"), "--device", "cpu"], capsys)
    assert status == 0
    old["args"]["weights"] = "none"  # resumed as it trained: from scratch
    torch.save(old, tmp_path / "old" / "last.pt")
    argv = [
        "--cache",
        str(cache),
        *SMALL,
        *"--test-size 2 --no-compile --max-iters 3 --no-eval --out".split(),
        str(tmp_path / "old"),
        "--resume",
    ]
    status, stdout, _ = cli(train_main, argv, capsys)
    assert status == 0 and "resuming" in stdout
    assert torch.load(tmp_path / "old" / "last.pt", weights_only=True)["iteration"] == 3


def test_resume_after_an_epoch_ends_with_the_same_weights_augmented_averaged_and_resampled(tiny, tmp_path, capsys):
    common = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-compile", "--no-eval", "--amp", "off"]
    common += ["--ema", "0.9"]  # what a resume restores with it is a superset of what it restores without
    common += ["--augment", "multiscale", "--color-jitter"]  # drawn by (seed, epoch, batch): the same after resume
    common += ["--repeat-factor", "0.9"]  # the repeated images drawn by (seed, epoch), an epoch longer than the set
    status, _, _ = run_train([*common, "--epochs", "2", "--out", str(tmp_path / "straight")], capsys)
    assert status == 0
    assert run_train([*common, "--epochs", "1", "--out", str(tmp_path / "split")], capsys)[0] == 0
    status, stdout, _ = run_train([*common, "--epochs", "2", "--out", str(tmp_path / "split"), "--resume"], capsys)
    assert status == 0 and "resuming" in stdout
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert straight["iteration"] == split["iteration"] > 8 and split["epoch"] == 2  # 8 images, batches of 2
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    # The average is the model; training goes on from the weights it averages.
    assert straight["ema"]["updates"] == split["ema"]["updates"] == split["iteration"]
    for key, value in straight["ema"]["trained"].items():
        assert torch.equal(value, split["ema"]["trained"][key]), key
    assert not torch.equal(straight["model"]["roi_heads.box_predictor.cls_score.weight"],
                           straight["ema"]["trained"]["roi_heads.box_predictor.cls_score.weight"])  # fmt: skip


def test_a_lean_checkpoint_loads_as_weights(tiny, tmp_path, capsys):
    common = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-compile", "--no-eval", "--max-iters", "1"]
    assert run_train([*common, "--out", str(tmp_path)], capsys)[0] == 0
    saved, pretrained = read_weights(tmp_path / "last.pt")
    model = create_model(ModelSpec("mobilenet_v3_fpn", min_size=96, max_size=160, pretrained=pretrained), saved)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    # The run trained from scratch: its model comes back as it trained, BatchNorm live.
    assert not pretrained and any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())


def test_resume_on_a_cache_rebuilt_since_is_refused_in_one_line(tmp_path, capsys):
    cache = build(SyntheticSource(10, seed=4), tmp_path / "c.h5", workers=0, progress=False)
    common = ["--cache", str(cache), *QUICK, "--out", str(tmp_path / "run")]
    assert cli(train_main, [*common, "--max-iters", "2"], capsys)[0] == 0
    saved = (tmp_path / "run" / "last.pt").read_bytes()
    for source in (SyntheticSource(10, seed=5), SyntheticSource(10, seed=4, classes=3)):  # other images, classes
        build(source, cache, workers=0, progress=False)
        status, _, stderr = cli(train_main, [*common, "--max-iters", "3", "--resume"], capsys)
        assert one_line(status, stderr, "--resume", str(cache), "is not the cache", "fingerprint"), stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == saved


def test_a_run_is_resumed_only_in_as_many_processes_as_it_ran(tiny, tmp_path, capsys):
    common = ["--cache", str(tiny), *QUICK, "--out", str(tmp_path / "run")]
    assert cli(train_main, [*common, "--max-iters", "1"], capsys)[0] == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as torchrun --nproc_per_node=2 writes it
    torch.save(state, tmp_path / "run" / "last.pt")
    status, _, stderr = cli(train_main, [*common, "--max-iters", "2", "--resume"], capsys)
    assert one_line(status, stderr, "trained by 2 process(es), not 1", "--nproc_per_node=2"), stderr


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_and_a_killed_ones_log_is_started_over(
    tiny, tmp_path, capsys
):
    common = ["--cache", str(tiny), *QUICK, "--max-iters", "1", "--out", str(tmp_path / "run")]
    assert cli(train_main, common, capsys)[0] == 0
    saved = {name: (tmp_path / "run" / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    status, _, stderr = cli(train_main, common, capsys)
    assert one_line(status, stderr, "--out", "holds a run already", "--resume"), stderr
    assert {name: (tmp_path / "run" / name).read_bytes() for name in saved} == saved
    killed = tmp_path / "killed"  # a run stopped before its first checkpoint leaves a log and no last.pt
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"epoch": 9, "iteration": 99}\n')
    assert cli(train_main, [*common[:-1], str(killed)], capsys)[0] == 0
    assert '"iteration": 99' not in (killed / "metrics.jsonl").read_text()
