"""Classes end to end: a model sized from the cache, class names and source ids in the checkpoint, evaluation on a
separate cache, per-class AP, and results in the source file's own ids that pycocotools scores as lean does."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lean.cache import Cache, build
from lean.checkpoint import load_model
from lean.coco import CocoSource
from lean.evaluate import coco_eval, detections, in_source_terms
from lean.evaluate import main as evaluate_main
from lean.predict import main as predict_main
from lean.synthetic import SyntheticSource
from lean.train import main as train_main
from tests.coco_files import annotation, dataset, polygon, write_coco
from tests.conftest import SMALL, cli, exit_status


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classes")
    train = build(SyntheticSource(10, seed=1, classes=3), folder / "train.h5", workers=0, progress=False)
    valid = build(SyntheticSource(4, seed=2, classes=3), folder / "valid.h5", workers=0, progress=False)
    return train, valid


@pytest.fixture(scope="module")
def trained(three_classes, tmp_path_factory):
    train, valid = three_classes
    out = tmp_path_factory.mktemp("run")
    argv = [
        "--cache",
        str(train),
        "--val-cache",
        str(valid),
        *SMALL,
        "--no-compile",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        status = exit_status(train_main, argv)
    assert status == 0
    return out


def test_the_model_is_sized_from_the_cache_and_the_checkpoint_names_its_classes(trained):
    model, spec, config = load_model(trained / "last.pt", "cpu")
    assert spec.class_names == ("person", "disc", "triangle") and spec.category_ids == (1, 2, 3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # three classes and background
    assert config.val_cache is not None


def test_a_run_with_a_validation_cache_evaluates_all_of_it_per_class(trained, three_classes):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    per_class = [record["per_class"] for record in records if "per_class" in record]
    assert len(per_class) == 1 and set(per_class[0]["segm"]) == {"person", "disc", "triangle"}


def test_evaluate_writes_per_class_stats_source_ids_and_coco_results(trained, three_classes, tmp_path, capsys):
    _, valid = three_classes
    argv = ["--checkpoint", str(trained / "last.pt"), "--device", "cpu", "--json", str(tmp_path / "s.json"),
            "--results", str(tmp_path / "r.json")]  # fmt: skip
    status, stdout, _ = cli(evaluate_main, argv, capsys)
    report = json.loads((tmp_path / "s.json").read_text())
    assert status == 0 and report["image_ids"] == Cache(valid).source_ids.tolist()  # all of the validation cache
    assert set(report["bbox"]["per_class"]) == {"person", "disc", "triangle"}
    assert "class" in stdout and "disc" in stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)


def test_a_validation_cache_of_other_classes_is_one_line(three_classes, tmp_path, capsys):
    train, _ = three_classes
    other = build(SyntheticSource(4, seed=2, classes=2), tmp_path / "other.h5", workers=0, progress=False)
    argv = ["--cache", str(train), "--val-cache", str(other), *SMALL, "--max-iters", "1", "--out", str(tmp_path / "r")]
    status, _, stderr = cli(train_main, argv, capsys)
    assert status == 2 and "--val-cache" in stderr and "are not the training cache's" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_predictions_are_named_and_coloured_by_class(trained, tmp_path, capsys):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(SyntheticSource(1, seed=5, classes=3).load(0).pixels).save(image)
    argv = [str(image), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--score-thresh", "0"]
    status, stdout, _ = cli(predict_main, [*argv, "--device", "cpu"], capsys)
    detections_ = json.loads(stdout)["detections"]
    assert status == 0 and detections_
    names = {"person": 1, "disc": 2, "triangle": 3}
    assert all(names[d["label"]] == d["category_id"] for d in detections_)


def test_results_in_the_sources_ids_score_as_lean_scores_them(tmp_path):
    categories = [{"id": 17, "name": "b"}, {"id": 4, "name": "a"}, {"id": 9, "name": "c"}]
    images = [{"id": 500 + k, "file_name": f"i{k}.png", "width": 60, "height": 48} for k in range(4)]
    rng = np.random.default_rng(0)
    annotations = []  # ids from 1: pycocotools takes a match with annotation 0 for no match
    for k, image in enumerate(images):
        for j in range(3):
            x, y, w, h = (
                int(v) for v in (rng.integers(0, 30), rng.integers(0, 24), rng.integers(8, 30), rng.integers(8, 24))
            )
            shape = {"segmentation": [polygon(x, y, w, h)], "bbox": [x, y, w, h], "area": float(w * h)}
            annotations.append(
                annotation(1 + 10 * k + j, image_id=image["id"], category_id=categories[j]["id"], **shape)
            )
    path = write_coco(tmp_path / "d", dataset(annotations, images=images, categories=categories))
    cache = Cache(build(CocoSource(path), tmp_path / "c.h5", workers=0, progress=False))
    indices = [0, 2, 3]
    predictions = []
    for i in indices:  # the ground truth, shifted and scored at random: neither perfect nor hopeless
        target = cache.target(i)
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 3, target["boxes"].shape)).float()
        masks = torch.roll(target["masks"], 2, dims=2)[:, None].float()
        scores = torch.from_numpy(rng.random(len(boxes))).float()
        predictions.append({"boxes": boxes, "scores": scores, "labels": target["labels"], "masks": masks})
    lean = coco_eval(cache, indices, predictions, verbose=False)
    results = in_source_terms(cache, detections(indices, predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        for kind in ("bbox", "segm"):
            other = "segmentation" if kind == "bbox" else "bbox"
            found = truth.loadRes([{k: v for k, v in r.items() if k != other} for r in results])
            evaluator = COCOeval(truth, found, kind)
            evaluator.params.imgIds = [int(cache.source_ids[i]) for i in indices]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            assert 0.1 < lean[kind]["AP"] < 0.99
            np.testing.assert_allclose(evaluator.stats, lean[kind]["stats"], atol=1e-6)
