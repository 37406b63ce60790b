"""Reliability: every bad input one line, no silent bad training, nothing lost under kill, full disk or two runs at
once. Each case was found failing by probing (issue 15) and is held here."""

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from lean.cache import Cache, build
from lean.cache.command import main as cache_main
from lean.checkpoint import RunFolder
from lean.evaluate import main as evaluate_main
from lean.pennfudan import PennFudanSource
from lean.predict import main as predict_main
from lean.predict import read_image
from lean.synthetic import SyntheticSource
from lean.train import cpu_hint, parse_args
from lean.train import main as train_main
from tests.conftest import SMALL, build_writing, cli, exit_status, wait_for, write_pennfudan

QUICK = [*SMALL, "--test-size", "2", "--no-eval"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(SyntheticSource(8, seed=3), tmp_path_factory.mktemp("tiny") / "tiny.h5", workers=0, progress=False)


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    status = exit_status(train_main, ["--cache", str(tiny), *QUICK, "--epochs", "1", "--out", str(out)])
    assert status == 0
    return out


def one_line(status, stderr, *words):
    return status == 2 and all(word in stderr for word in words) and len(stderr.strip().splitlines()) == 1


# --- silent bad training -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--clip-grad=-1"], ["--clip-grad", "positive"]),
        (["--clip-grad", "0"], ["--clip-grad", "positive"]),
        (["--max-iters", "0"], ["--max-iters", "at least 1"]),
        (["--max-iters=-5"], ["--max-iters", "at least 1"]),
        (["--seed=-1"], ["--seed", "negative"]),
        (["--test-size", "0"], ["--test-size", "at least 1"]),
        (["--min-size", "900", "--max-size", "800"], ["--min-size", "--max-size"]),
    ],
)
def test_every_numeric_training_argument_is_checked_in_one_line(argv, words, capsys):
    status, _, stderr = cli(train_main, argv, capsys)
    assert one_line(status, stderr, *words), stderr


def test_numeric_arguments_of_build_and_predict_are_checked_too(run_dir, tmp_path, capsys):
    status, _, stderr = cli(
        cache_main, ["build", "--source", "synthetic", "--seed=-1", "--out", str(tmp_path / "c.h5")], capsys
    )
    assert one_line(status, stderr, "--seed")
    argv = ["x.png", "--checkpoint", str(run_dir / "last.pt"), "--score-thresh", "2"]
    status, _, stderr = cli(predict_main, argv, capsys)
    assert one_line(status, stderr, "--score-thresh")


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    levels = (np.arange(6 * 8).reshape(6, 8) * 1300).astype(np.uint16)  # 0 .. 61100 of 65535
    id_map = np.zeros((6, 8), np.uint8)
    id_map[1:4, 2:6] = 1
    root = write_pennfudan(tmp_path / "d", [("a", np.zeros((6, 8, 3), np.uint8), id_map)])
    Image.fromarray(levels).save(root / "PNGImages" / "a.png")
    assert Image.open(root / "PNGImages" / "a.png").mode.startswith("I;16")
    expected = np.round(levels * (255 / 65535)).astype(np.uint8)
    cache = Cache(build(PennFudanSource(root), tmp_path / "c.h5", workers=0, progress=False))
    assert np.array_equal(cache.image(0), np.repeat(expected[..., None], 3, axis=2))  # not all white
    assert np.array_equal(read_image(root / "PNGImages" / "a.png")[0].numpy(), expected)


@pytest.mark.parametrize("flag, value", [("--batch-size", "4"), ("--lr", "0.5"), ("--backbone", "resnet18_fpn"),
                                         ("--optimizer", "adamw")])  # fmt: skip
def test_resume_refuses_a_setting_it_would_not_keep(run_dir, tiny, flag, value, capsys):
    argv = ["--cache", str(tiny), *QUICK, "--epochs", "2", "--out", str(run_dir), "--resume", flag, value]
    status, _, stderr = cli(train_main, argv, capsys)
    assert one_line(status, stderr, "--resume", flag), stderr


def test_resume_takes_the_runs_settings_and_the_flags_that_may_change(run_dir):
    config = parse_args(["--out", str(run_dir), "--resume", "--epochs", "5", "--log-every", "3"])
    assert config.backbone == "mobilenet_v3_fpn" and config.min_size == 96 and config.test_size == 2  # the run's
    assert config.epochs == 5 and config.log_every == 3 and config.resume


def _flip_byte(path, dataset, index=0):
    with h5py.File(path, "r+") as handle:
        data = handle[dataset][...]
        flat = data.reshape(-1).view(np.uint8)
        flat[index] ^= 0xFF
        handle[dataset][...] = data


@pytest.mark.parametrize("dataset", ["sizes", "pixel_offsets", "instance_offsets", "mask_offsets", "mask_crops"])
def test_a_cache_with_flipped_index_bytes_is_refused_in_one_line(tiny, tmp_path, dataset, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    _flip_byte(path, dataset, index=8 if dataset.endswith("offsets") else 0)
    for argv in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, argv, capsys)
        assert one_line(status, stderr, "damaged cache"), stderr
    status, _, stderr = cli(train_main, ["--cache", str(path), *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert one_line(status, stderr, "damaged cache") and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "attribute, value, reason",
    [
        ("classes", "not json", "attribute classes"),
        ("classes", "5", "attribute classes"),
        ("params", "{", "attribute params"),
        ("skipped", "[1]", "attribute skipped"),
        ("category_ids", "[1, 2, 3, 4, 5, 6, 7]", "classes"),
        ("box_end", "sideways", "box end"),
    ],
)
def test_a_cache_with_a_damaged_attribute_is_refused_in_one_line(tiny, tmp_path, attribute, value, reason, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        handle.attrs[attribute] = value
    for argv in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, argv, capsys)
        assert one_line(status, stderr, f"damaged cache ({reason})"), stderr


def test_flipped_pixel_bytes_are_found_by_their_checksum_without_the_source(tiny, tmp_path, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        pixels = handle["pixels"][...]
        pixels.reshape(-1)[1000] ^= 0x40
        handle["pixels"][...] = pixels
    status, stdout, _ = cli(cache_main, ["verify", str(path)], capsys)
    assert status == 1 and "MISMATCH" in stdout and "checksum" in stdout


# --- one line where there were tracebacks ------------------------------------------------------------


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


def test_a_build_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("lean.cache.writer.h5py.File", read_only)
    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    status, _, stderr = cli(
        cache_main, ["build", "--source", "synthetic", "--num-images", "2", "--out", str(tmp_path / "c.h5")], capsys
    )
    assert one_line(status, stderr, "Read-only file system"), stderr


def test_prediction_refuses_a_decompression_bomb_in_one_line_and_goes_on(run_dir, tmp_path, capsys):
    huge = tmp_path / "huge.png"
    Image.new("1", (15000, 15000)).save(huge)  # 225 megapixels, a few KB on disk
    good = tmp_path / "good.png"
    Image.fromarray(SyntheticSource(1, seed=1).load(0).pixels).save(good)
    argv = [
        str(huge),
        str(good),
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1 and "huge.png" in stderr and "megapixels" in stderr and len(stderr.strip().splitlines()) == 1
    assert (tmp_path / "o" / "good.png").is_file() and '"image"' in stdout


def _until_importing(process, package):
    """Read the -X importtime lines of `process` until a module of `package` has been imported."""
    return any(line.rpartition("|")[2].strip().startswith(f"{package}.") for line in process.stderr)


@pytest.mark.parametrize("when", ["torch loading", "building"])
def test_ctrl_c_while_the_build_command_starts_is_one_line(tmp_path, when):
    out = tmp_path / "c.h5"
    timing = ["-X", "importtime"] if when == "torch loading" else []  # each import as a line on stderr
    command = [sys.executable, *timing, "-m", "lean.cache", "build", "--source", "synthetic",
               "--num-images", "3000", "--workers", "2", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "torch loading":  # the first of torch's modules is in: torch itself is loading
        assert _until_importing(process, "torch")
    else:
        assert wait_for(build_writing(tmp_path, out.name))
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr, stderr[-2000:]


# --- nothing lost, nothing left behind -----------------------------------------------------------------


def _build_command(out, count=3000):
    return [sys.executable, "-m", "lean.cache", "build", "--source", "synthetic", "--num-images", str(count),
            "--workers", "2", "--out", str(out)]  # fmt: skip


def _processes_writing(path):
    """PIDs whose command line names `path` (the build and its forked workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if str(path).encode() in cmdline.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_build_leaves_no_workers_and_its_temporary_is_cleared(tmp_path, how):
    out = tmp_path / "c.h5"
    process = subprocess.Popen(_build_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(build_writing(tmp_path, out.name))
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert wait_for(lambda: not _processes_writing(out), timeout=20)  # the workers died with their parent
    if how == signal.SIGTERM:
        assert not list(tmp_path.glob(".c.h5.*.tmp"))
    else:  # a SIGKILLed build cannot clean up: the next one does
        assert list(tmp_path.glob(".c.h5.*.tmp"))
        subprocess.run(_build_command(out, count=2), check=True, capture_output=True, timeout=120)
        assert not list(tmp_path.glob(".c.h5.*.tmp")) and out.is_file()


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


def test_a_bad_cache_leaves_no_output_folder(tmp_path, capsys):
    status, _, _ = cli(
        train_main, ["--cache", str(tmp_path / "missing.h5"), *QUICK, "--out", str(tmp_path / "r")], capsys
    )
    assert status == 2 and not (tmp_path / "r").exists()


def test_sigterm_during_the_last_evaluation_says_it_stopped(tiny, tmp_path, capsys, monkeypatch):
    import lean.train

    real = lean.train.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr("lean.train.evaluate", interrupted)
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--epochs", "1", "--out", str(tmp_path / "r")]
    status, stdout, _ = cli(train_main, argv, capsys)
    assert status == 143 and "stopped by signal" in stdout


def test_predictions_of_images_with_the_same_name_do_not_overwrite_each_other(run_dir, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(SyntheticSource(2, seed=1).load(folder == "b").pixels).save(tmp_path / folder / "same.png")
    images = [str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png")]
    argv = [*images, "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli(predict_main, argv, capsys)[0] == 0
    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == ["same-1.png", "same.png"]


def test_large_images_are_predicted_at_the_models_size_and_drawn_and_reported_at_their_own(run_dir, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.kron(SyntheticSource(1, seed=2).load(0).pixels, np.ones((8, 8, 1), np.uint8))).save(big)
    argv = [str(big), "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--score-thresh", "0"]  # fmt: skip
    status, stdout, _ = cli(predict_main, argv, capsys)
    line = json.loads(stdout)
    width, height = Image.open(big).size
    assert status == 0 and Image.open(tmp_path / "o" / "big.png").size == (width, height)
    boxes = [d["box"] for d in line["detections"]]
    assert boxes and all(box[2] <= width + 1 and box[3] <= height + 1 for box in boxes)
    assert max(box[2] for box in boxes) > 160  # in the photo's pixels, not the model's (--max-size 160)


def test_exif_orientation_is_applied_to_what_is_predicted(tmp_path):
    photo = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a viewer shows it upright, 30 x 40
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo, exif=exif)
    assert tuple(read_image(photo).shape) == (3, 40, 30)


def test_on_a_cpu_the_tutorials_sizes_come_with_a_line_of_what_to_expect():
    cpu = torch.device("cpu")
    assert "mobilenet_v3_fpn" in cpu_hint(parse_args(["--device", "cpu"]), cpu)
    assert cpu_hint(parse_args(["--device", "cpu", "--backbone", "mobilenet_v3_fpn"]), cpu) is None
    assert cpu_hint(parse_args(["--device", "cpu", "--max-size", "512", "--min-size", "320"]), cpu) is None
