"""lean.export: ONNX and TorchScript files of a trained model, checked against it, run by lean.predict --model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lean.export
from lean.deployed import SPEC_KEY, OnnxModel, TorchScriptModel
from lean.export import difference, export_torchscript
from lean.export import main as export_main
from lean.predict import main as predict_main
from lean.synthetic import SyntheticSource
from lean.train import main as train_main
from tests.conftest import QUICK, cli, exit_status, one_line


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The small Mask R-CNN of `run_dir` exported to both formats, checked at a low threshold to compare many."""
    folder = tmp_path_factory.mktemp("exported")
    argv = [str(run_dir / "last.pt"), "--onnx", str(folder / "m.onnx"), "--torchscript", str(folder / "m.pt")]
    assert exit_status(export_main, [*argv, "--score-thresh", "0.05"]) == 0
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two synthetic images, one of them turned on its side: another aspect ratio."""
    folder = tmp_path_factory.mktemp("photos")
    pixels = [SyntheticSource(2, seed=3).load(k).pixels for k in range(2)]
    Image.fromarray(pixels[0]).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(pixels[1].transpose(1, 0, 2))).save(folder / "b.png")
    return folder


def predictions(argv, capsys):
    status, stdout, _ = cli(predict_main, argv, capsys)
    assert status == 0
    return [json.loads(line) for line in stdout.splitlines()]


def same_detection(a, b):
    """Two JSON detections agree: class, score within 1e-3, box within 0.5 px (the check's tolerances)."""
    close = abs(a["score"] - b["score"]) <= 1e-3 and np.abs(np.subtract(a["box"], b["box"])).max() <= 0.5
    return close and (a["label"], a["category_id"]) == (b["label"], b["category_id"])


@pytest.mark.parametrize("name", ["m.onnx", "m.pt"])
def test_predict_with_an_exported_file_finds_and_draws_what_the_checkpoint_does(name, run_dir, exported, photos,
                                                                                tmp_path, capsys):  # fmt: skip
    common = [str(photos), "--score-thresh", "0.05", "--device", "cpu"]
    expected = predictions([*common, "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "c")], capsys)
    got = predictions([*common, "--model", str(exported / name), "--out", str(tmp_path / "m")], capsys)
    assert sum(len(line["detections"]) for line in expected) > 0
    for want, have in zip(expected, got, strict=True):
        assert len(have["detections"]) == len(want["detections"])
        unmatched = list(have["detections"])
        for a in want["detections"]:
            b = next(b for b in unmatched if same_detection(a, b))
            unmatched.remove(b)
        picture = (np.asarray(Image.open(want["picture"]), int), np.asarray(Image.open(have["picture"]), int))
        assert (np.abs(picture[0] - picture[1]).max(-1) > 8).mean() < 0.01  # a mask edge's pixel or two may differ


def test_the_exported_files_carry_the_class_names_and_category_ids(run_dir, exported):
    state = torch.load(run_dir / "last.pt", weights_only=True)
    names = tuple(state["model_spec"]["class_names"])
    for model in (OnnxModel(exported / "m.onnx"), TorchScriptModel(exported / "m.pt")):
        assert model.spec.class_names == names and model.spec.task == "segment"
    assert TorchScriptModel(exported / "m.pt").module.class_names == list(names)
    assert json.loads(getattr(TorchScriptModel(exported / "m.pt").module, SPEC_KEY))["category_ids"] == [1]


def test_a_detect_model_exports_boxes_alone_and_runs_on_an_image_with_no_detections(tiny, photos, tmp_path):
    out = tmp_path / "run"
    assert exit_status(train_main, ["--cache", str(tiny), *QUICK, "--task", "detect", "--max-iters", "1",
                                         "--out", str(out)]) == 0  # fmt: skip
    argv = [str(out / "last.pt"), "--torchscript", str(tmp_path / "d.pt"), "--images", str(photos)]
    assert exit_status(export_main, [*argv, "--score-thresh", "0"]) == 0
    model = TorchScriptModel(tmp_path / "d.pt")
    (output,) = model([torch.full((3, 50, 70), 114, dtype=torch.uint8)])
    assert set(output) == {"boxes", "labels", "scores"} and model.spec.task == "detect"
    (output,) = model([torch.zeros((3, 40, 30), dtype=torch.uint8)])
    assert output["boxes"].shape[1:] == (4,)  # zero or more rows, never an error


def detection(label, score, box, mask=None):
    found = {
        "labels": torch.tensor([label]),
        "scores": torch.tensor([score]),
        "boxes": torch.tensor([box], dtype=torch.float32),
    }
    return found if mask is None else found | {"masks": mask[None, None].float()}


def test_the_comparison_names_what_differs_and_allows_the_stated_tolerances():
    box = [10.0, 10.0, 30.0, 40.0]
    mask = torch.zeros(50, 50, dtype=torch.bool)
    mask[10:40, 10:30] = True
    model = detection(1, 0.9, box, mask)
    assert difference(model, detection(1, 0.9005, [10.4, 9.6, 30.2, 40.0], mask), 0.5) is None
    assert "no detection matches" in difference(model, detection(1, 0.9, [11.0, 10.0, 30.0, 40.0], mask), 0.5)
    assert "no detection matches" in difference(model, detection(1, 0.902, box, mask), 0.5)
    assert "no detection matches" in difference(model, detection(2, 0.9, box, mask), 0.5)
    shrunk = mask.clone()
    shrunk[10:12] = False
    assert "IoU" in difference(model, detection(1, 0.9, box, shrunk), 0.5)
    assert difference(model, detection(1, 0.9, [10.3, 10.0, 30.0, 40.0], shrunk), 0.5) is None  # a near-tied region
    assert "an extra detection" in difference(detection(1, 0.2, box, mask), model, 0.5)
    assert difference(detection(1, 0.5004, box, mask), detection(1, 0.4999, box, mask), 0.5) is None  # at the line


def test_a_file_that_disagrees_with_the_model_is_one_line_and_not_left_behind(run_dir, monkeypatch, tmp_path, capsys):
    def perturbed(deployable, example, path):
        with torch.no_grad():
            deployable.model.roi_heads.box_predictor.bbox_pred.bias.add_(5.0)
        export_torchscript(deployable, example, path)

    monkeypatch.setitem(lean.export.FORMATS, "TorchScript", (perturbed, TorchScriptModel))
    argv = [str(run_dir / "last.pt"), "--torchscript", str(tmp_path / "m.pt"), "--score-thresh", "0.05"]
    status, _, stderr = cli(export_main, argv, capsys)
    assert one_line(status, stderr, "image 0", "TorchScript file's detections are not the model's")
    assert list(tmp_path.iterdir()) == []


def test_a_model_the_exporter_cannot_take_is_one_line_naming_it(run_dir, monkeypatch, tmp_path, capsys):
    def refuses(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'frobnicate' to ONNX opset version 17 is not supported.\ndetails")

    monkeypatch.setattr(torch.onnx, "export", refuses)
    status, _, stderr = cli(export_main, [str(run_dir / "last.pt"), "--onnx", str(tmp_path / "m.onnx")], capsys)
    assert one_line(status, stderr, "mobilenet_v3_fpn Mask R-CNN", "cannot be exported as ONNX", "frobnicate")
    assert list(tmp_path.iterdir()) == []


def test_bad_targets_are_one_line_before_any_work(run_dir, tmp_path, capsys):
    checkpoint = str(run_dir / "last.pt")
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("mine")
    cases = [
        ([checkpoint, "--onnx", str(tmp_path / "missing" / "m.onnx")], "no folder"),
        ([checkpoint, "--torchscript", checkpoint], "is one of this command's inputs"),
        ([checkpoint, "--onnx", str(foreign)], "a file this command did not write"),
        ([checkpoint, "--onnx", str(tmp_path)], "is a folder"),
        ([checkpoint, "--torchscript", "/proc/lean-export.pt"], "cannot write in /proc"),
        ([checkpoint, "--onnx", str(tmp_path / "a"), "--torchscript", str(tmp_path / "a")], "the same file"),
        ([checkpoint], "give --onnx FILE, --torchscript FILE or both"),
        ([str(foreign), "--torchscript", str(tmp_path / "m.pt")], "notes.onnx"),
    ]
    for argv, words in cases:
        status, _, stderr = cli(export_main, argv, capsys)
        assert one_line(status, stderr, words), (argv, stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.onnx"] and foreign.read_text() == "mine"


def test_without_onnxruntime_onnx_is_one_line_saying_what_to_install(run_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(lean.export, "missing_onnx_packages", lambda: ["onnxruntime"])
    status, _, stderr = cli(export_main, [str(run_dir / "last.pt"), "--onnx", str(tmp_path / "m.onnx")], capsys)
    assert one_line(status, stderr, "onnxruntime", "pip install")


def test_predict_refuses_a_file_that_is_not_an_export_in_one_line(tmp_path, photos, capsys):
    for name in ("x.onnx", "x.pt"):
        (tmp_path / name).write_bytes(b"\x00not a model")
        status, _, stderr = cli(predict_main, [str(photos), "--model", str(tmp_path / name)], capsys)
        assert one_line(status, stderr, name)
