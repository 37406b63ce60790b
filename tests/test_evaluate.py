"""COCO evaluation from the cache against pycocotools on ground truth built from the PNGs, and the two commands."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.seed_pipeline import seed_targets
from lean.cache import Cache, build
from lean.coco import CocoSource
from lean.evaluate import STAT_NAMES, _coco, coco_eval, confusion, detections, in_source_terms, on_host
from lean.evaluate import main as evaluate_main
from lean.pennfudan import PennFudanSource
from lean.plot import EVALUATION_PLOTS, drawn_by_evaluation
from lean.synthetic import SyntheticSource
from tests.coco_files import annotation, dataset, polygon, write_coco
from tests.conftest import cli


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_cut_before_leaving_the_device_give_the_detections_the_float_masks_give(dtype):
    """And a batch's outputs come off the device as they went in, each image's its own."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 1, 9, 7, generator=generator)
    masks[0, 0, 0, :3] = torch.tensor([0.5, 0.5 + 1e-3, 0.5 - 1e-3])  # at and around the cut
    output = {"boxes": torch.rand(4, 4) * 5, "scores": torch.rand(4), "labels": torch.ones(4, dtype=torch.int64),
              "masks": masks.to(dtype)}  # fmt: skip
    (host,) = on_host([output])
    assert host["masks"].dtype == torch.bool and host["scores"].dtype == torch.float32
    assert detections([3], [host]) == detections([3], [{**output, "masks": output["masks"].float()}])


@pytest.fixture
def folder_cache(small_folder, tmp_path):
    return small_folder, Cache(build(PennFudanSource(small_folder), tmp_path / "c.h5", workers=0, progress=False))


def perfect(cache, indices):
    predictions = []
    for i in indices:
        target = cache.target(i)
        count = len(target["boxes"])
        predictions.append(
            {
                "boxes": target["boxes"],
                "scores": torch.linspace(1, 0.5, count),
                "labels": target["labels"],
                "masks": target["masks"][:, None].float(),
            }
        )
    return predictions


def perturbed(cache, indices, seed):
    """Jittered boxes, shifted and partly wrong masks, one missed instance, false positives, random scores."""
    rng = np.random.default_rng(seed)
    predictions = []
    for i in indices:
        target = cache.target(i)
        height, width = cache.sizes[i]
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 3, target["boxes"].shape)).float()
        masks = torch.roll(target["masks"], shifts=int(rng.integers(-2, 3)), dims=2)[:, None].float()
        keep = torch.from_numpy(rng.random(len(boxes)) > 0.15)
        boxes, masks = boxes[keep], masks[keep]
        extra = int(rng.integers(0, 3))
        corners = torch.from_numpy(rng.uniform(0, [width / 2, height / 2], (extra, 2))).float()
        boxes = torch.cat([boxes, torch.cat([corners, corners + 20], 1)])
        fake = torch.zeros(extra, 1, height, width)
        for k, (x, y) in enumerate(corners.long().tolist()):
            fake[k, 0, y : y + 20, x : x + 20] = 0.9
        masks = torch.cat([masks * torch.from_numpy(rng.uniform(0.4, 1.0, (len(masks), 1, 1, 1))).float(), fake])
        count = len(boxes)
        predictions.append(
            {
                "boxes": boxes,
                "scores": torch.from_numpy(rng.random(count)).float(),
                "labels": torch.ones(count, dtype=torch.int64),
                "masks": masks,
            }
        )
    return predictions


def independent_stats(root, names, predictions):
    """pycocotools on ground truth rebuilt from the PNG masks the references' way, predictions loaded by loadRes."""
    images, annotations = [], []
    for index, name in enumerate(names):
        id_map = np.array(Image.open(root / "PedMasks" / f"{name}_mask.png"))
        target = seed_targets(id_map, index)
        images.append({"id": index, "height": id_map.shape[0], "width": id_map.shape[1]})
        boxes = target["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for box, area, mask in zip(boxes.tolist(), target["area"].tolist(), target["masks"].numpy()):
            rle = mask_util.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        for kind in ("bbox", "segm"):
            results = []
            for index, prediction in enumerate(predictions):
                for box, score, mask in zip(
                    prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["masks"]
                ):
                    x0, y0, x1, y1 = box
                    result = {"image_id": index, "category_id": 1, "score": score}
                    if kind == "bbox":
                        result["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                    else:
                        result["segmentation"] = mask_util.encode(
                            np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8))
                        )
                    results.append(result)
            evaluator = COCOeval(truth, truth.loadRes(results), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[kind] = list(evaluator.stats)
    return stats


def test_perfect_predictions_score_one(folder_cache, capsys):
    _, cache = folder_cache
    indices = list(range(len(cache)))
    report = coco_eval(cache, indices, perfect(cache, indices))
    for kind in ("bbox", "segm"):
        assert report[kind]["AP"] == pytest.approx(1.0) and report[kind]["AP50"] == pytest.approx(1.0)
        extra = ["confusion"] if kind == "bbox" else []
        assert list(report[kind]) == [*STAT_NAMES, "stats", "per_class", "pr_curves", *extra]
        assert len(report[kind]["stats"]) == 12
        assert report[kind]["per_class"] == {"person": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}}
    assert report["bbox"]["confusion"]["per_class"] == {"person": {"precision": 1.0, "recall": 1.0}}
    printed = capsys.readouterr().out
    assert "IoU metric: bbox" in printed and "IoU metric: segm" in printed and printed.count("Average Precision") == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pycocotools_on_ground_truth_from_the_pngs(folder_cache, seed):
    root, cache = folder_cache
    indices = list(range(len(cache)))
    predictions = perturbed(cache, indices, seed)
    ours = coco_eval(cache, indices, predictions, verbose=False)
    theirs = independent_stats(root, cache.names, predictions)
    assert 0 < ours["bbox"]["AP"] < 1 and 0 < ours["segm"]["AP"] < 1  # the perturbations matter
    for kind in ("bbox", "segm"):
        assert np.allclose(ours[kind]["stats"], theirs[kind], atol=1e-4), (kind, ours[kind]["stats"], theirs[kind])


def test_no_detections_score_zero(folder_cache):
    _, cache = folder_cache
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 1, 4, 4),
    }
    report = coco_eval(cache, range(len(cache)), [empty] * len(cache), verbose=False)
    assert report["bbox"]["AP"] == 0 and report["segm"]["AP"] == 0


def test_training_writes_the_stats_of_every_evaluation(short_run):
    _, run_dir = short_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if "segm" in record]
    assert len(evaluations) == 1 and len(evaluations[0]["bbox"]) == 12
    assert (run_dir / "best.pt").is_file()


def test_evaluate_command_writes_json(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    status, stdout, _ = cli(
        evaluate_main,
        ["--checkpoint", str(run_dir / "last.pt"), "--json", str(tmp_path / "s.json"), "--device", "cpu"],
        capsys,
    )
    report = json.loads((tmp_path / "s.json").read_text())
    assert status == 0 and set(report) == {"bbox", "segm", "image_ids"} and len(report["segm"]["stats"]) == 12
    assert "IoU metric: segm" in stdout


def test_evaluate_refuses_a_foreign_file_in_one_line(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    status, _, stderr = cli(evaluate_main, ["--checkpoint", str(tmp_path / "x.pt"), "--device", "cpu"], capsys)
    assert status == 2 and "not a lean checkpoint" in stderr and len(stderr.strip().splitlines()) == 1


def test_evaluate_writes_per_class_stats_source_ids_and_coco_results(trained, three_classes, tmp_path, capsys):
    _, valid = three_classes
    argv = ["--checkpoint", str(trained / "last.pt"), "--device", "cpu", "--json", str(tmp_path / "s.json"),
            "--results", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")]  # fmt: skip
    status, stdout, _ = cli(evaluate_main, argv, capsys)
    report = json.loads((tmp_path / "s.json").read_text())
    assert status == 0 and report["image_ids"] == Cache(valid).source_ids.tolist()  # all of the validation cache
    assert set(report["bbox"]["per_class"]) == {"person", "disc", "triangle"}
    confusion = report["bbox"]["confusion"]
    assert confusion["labels"] == ["person", "disc", "triangle", "background"] and len(confusion["matrix"]) == 4
    assert set(confusion["per_class"]["disc"]) == {"precision", "recall"}
    assert all(drawn_by_evaluation(tmp_path / "plots" / name) for name in EVALUATION_PLOTS)
    assert all(drawn_by_evaluation(trained / name) for name in EVALUATION_PLOTS)  # the run drew its last one
    assert "class" in stdout and "disc" in stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)


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


def test_evaluate_never_writes_over_its_checkpoint_its_cache_or_a_file_it_did_not_write(trained_run, tmp_path, capsys):
    cache, run_dir = trained_run
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes((run_dir / "last.pt").read_bytes())
    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    kept = {path: path.read_bytes() for path in (checkpoint, cache, notes)}
    base = ["--checkpoint", str(checkpoint), "--device", "cpu"]
    cases = [
        (["--json", str(checkpoint)], "is one of this command's inputs"),
        (["--results", str(checkpoint)], "is one of this command's inputs"),
        (["--json", str(cache)], "is one of this command's inputs"),
        (["--results", str(notes)], "did not write"),
        (["--json", str(tmp_path / "s.json"), "--results", str(tmp_path / "s.json")], "both name"),
    ]
    for flags, reason in cases:
        status, _, stderr = cli(evaluate_main, [*base, *flags], capsys)
        assert status == 2 and reason in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert {path: path.read_bytes() for path in kept} == kept
    for _ in range(2):  # its own outputs it writes again
        assert cli(evaluate_main, [*base, "--json", str(tmp_path / "s.json")], capsys)[0] == 0


def test_a_split_that_cannot_be_made_is_one_line_and_all_needs_none(run_dir, tmp_path, capsys):
    one = build(SyntheticSource(1, seed=7), tmp_path / "one.h5", workers=0, progress=False)
    base = ["--checkpoint", str(run_dir / "last.pt"), "--cache", str(one), "--device", "cpu"]
    assert cli(evaluate_main, [*base, "--split", "all"], capsys)[0] == 0
    status, _, stderr = cli(evaluate_main, [*base, "--split", "test"], capsys)
    assert status == 2 and "--split test:" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_detection_exports_results_score_with_pycocotools_as_lean_scores_them(tmp_path):
    categories = [{"id": 17, "name": "b"}, {"id": 4, "name": "a"}]
    images = [{"id": 700 + k, "file_name": f"i{k}.png", "width": 60, "height": 48} for k in range(3)]
    rng = np.random.default_rng(1)
    annotations = []
    for k, image in enumerate(images):
        for j in range(3):
            x, y, w, h = (int(v) for v in (rng.integers(0, 30), rng.integers(0, 24), rng.integers(8, 30),
                                             rng.integers(8, 24)))  # fmt: skip
            box_only = annotation(1 + 10 * k + j, image_id=image["id"], category_id=categories[j % 2]["id"],
                                  bbox=[x, y, w, h], area=float(w * h))  # fmt: skip
            del box_only["segmentation"]  # a detection export (with an area: pycocotools needs one in the file)
            annotations.append(box_only)
    path = write_coco(tmp_path / "d", dataset(annotations, images=images, categories=categories))
    cache = Cache(build(CocoSource(path), tmp_path / "c.h5", workers=0, progress=False))
    assert not cache.has_masks
    indices = [0, 1, 2]
    predictions = []
    for i in indices:  # the ground truth's boxes, shifted and scored at random: a Faster R-CNN's output
        instances = cache.instance_targets(i)
        boxes = torch.from_numpy(instances["boxes"] + rng.normal(0, 3, instances["boxes"].shape)).float()
        scores = torch.from_numpy(rng.random(len(boxes))).float()
        predictions.append({"boxes": boxes, "scores": scores, "labels": torch.from_numpy(instances["labels"])})
    lean = coco_eval(cache, indices, predictions, verbose=False, metrics=("bbox",))
    results = in_source_terms(cache, detections(indices, predictions))
    assert set(lean) == {"bbox"} and not any("segmentation" in result for result in results)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        evaluator = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluator.params.imgIds = [int(cache.source_ids[i]) for i in indices]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert 0.1 < lean["bbox"]["AP"] < 0.99
    np.testing.assert_allclose(evaluator.stats, lean["bbox"]["stats"], atol=1e-6)


def test_the_confusion_matrix_counts_matches_confusions_misses_and_false_positives():
    boxes = {"a": [0, 0, 10, 10], "b": [20, 20, 10, 10], "c": [40, 40, 10, 10]}
    truth = _coco({
        "images": [{"id": 0, "height": 80, "width": 80}],
        "annotations": [{"id": k + 1, "image_id": 0, "category_id": label, "bbox": boxes[name], "area": 100.0,
                         "iscrowd": 0} for k, (name, label) in enumerate([("a", 1), ("b", 2), ("c", 1)])],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    })  # fmt: skip
    found = [
        {"image_id": 0, "category_id": 1, "bbox": [0.5, 0, 10, 10], "score": 0.9},  # a, rightly
        {"image_id": 0, "category_id": 1, "bbox": [20, 20, 10, 9], "score": 0.8},  # b, called a cat
        {"image_id": 0, "category_id": 2, "bbox": [60, 60, 5, 5], "score": 0.7},  # nothing there
        {"image_id": 0, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.1},  # c, below the score cut
    ]
    table = confusion(truth, found, [0], ["cat", "dog"])
    assert table["matrix"] == [[1, 1, 0], [0, 0, 1], [1, 0, 0]]  # rows predicted, columns true; c missed
    assert table["per_class"] == {"cat": {"precision": 0.5, "recall": 0.5}, "dog": {"precision": 0.0, "recall": 0.0}}


def test_each_classs_pr_curve_averages_to_the_ap_printed(cache):
    indices = list(range(12))
    rng = np.random.default_rng(1)
    predictions = []
    for i in indices:
        target = cache.target(i)
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 3, target["boxes"].shape)).float()
        predictions.append({"boxes": boxes, "scores": torch.from_numpy(rng.random(len(boxes))).float(),
                            "labels": target["labels"]})  # fmt: skip
    report = coco_eval(cache, indices, predictions, verbose=False, metrics=("bbox",))["bbox"]
    for name, curve in report["pr_curves"].items():
        at50, overall = np.array(curve["iou50"]), np.array(curve["iou50_95"])
        assert np.isclose(at50.mean(), report["per_class"][name]["AP50"])
        assert np.isclose(overall.mean(), report["per_class"][name]["AP"]) and len(curve["recall"]) == 101


def test_plots_into_a_file_or_over_a_picture_it_did_not_draw_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["--checkpoint", str(run_dir / "last.pt"), "--device", "cpu", "--plots"]
    status, _, stderr = cli(evaluate_main, [*argv, str(tmp_path / "file")], capsys)
    assert status == 2 and "--plots" in stderr and "is a file" in stderr
    Image.new("RGB", (4, 4)).save(tmp_path / "pr_curves.png")
    status, _, stderr = cli(evaluate_main, [*argv, str(tmp_path)], capsys)
    assert status == 2 and "a file this command did not write" in stderr
