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
from torchvision.ops.misc import FrozenBatchNorm2d

from bench.seed_pipeline import seed_targets
from lean.cache import Cache, build
from lean.checkpoint import load_model
from lean.evaluate import STAT_NAMES, coco_eval, detections, on_host
from lean.evaluate import main as evaluate_main
from lean.pennfudan import PennFudanSource
from lean.predict import main as predict_main
from lean.train import main as train_main
from tests.conftest import SMALL, cli


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_cut_before_leaving_the_device_give_the_detections_the_float_masks_give(dtype):
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 1, 9, 7, generator=generator)
    masks[0, 0, 0, :3] = torch.tensor([0.5, 0.5 + 1e-3, 0.5 - 1e-3])  # at and around the cut
    output = {"boxes": torch.rand(4, 4) * 5, "scores": torch.rand(4), "labels": torch.ones(4, dtype=torch.int64),
              "masks": masks.to(dtype)}  # fmt: skip
    host = on_host(output)
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
        assert list(report[kind]) == [*STAT_NAMES, "stats", "per_class"] and len(report[kind]["stats"]) == 12
        assert report[kind]["per_class"] == {"person": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}}
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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A checkpoint from two training iterations of the small model: enough to exercise the commands."""
    from lean.synthetic import SyntheticSource

    folder = tmp_path_factory.mktemp("run")
    cache = build(SyntheticSource(8, seed=2), folder / "c.h5", workers=0, progress=False)
    argv = [
        "--cache",
        str(cache),
        *SMALL,
        *"--test-size 2 --no-compile --max-iters 2 --out".split(),
        str(folder / "run"),
    ]
    with pytest.raises(SystemExit) as exited:
        from lean.cli import run

        run(train_main, argv)
    assert exited.value.code == 0
    return cache, folder / "run"


def test_training_writes_the_stats_of_every_evaluation(trained_run):
    _, run_dir = trained_run
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


def test_a_checkpoint_written_before_the_schema_still_evaluates_and_resumes(trained_run, tmp_path, capsys):
    cache, run_dir = trained_run
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


def test_evaluate_refuses_a_foreign_file_in_one_line(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    status, _, stderr = cli(evaluate_main, ["--checkpoint", str(tmp_path / "x.pt"), "--device", "cpu"], capsys)
    assert status == 2 and "not a lean checkpoint" in stderr and len(stderr.strip().splitlines()) == 1


def test_predict_draws_each_image_and_reports_the_unreadable_one(trained_run, small_folder, tmp_path, capsys):
    _, run_dir = trained_run
    good = sorted((small_folder / "PNGImages").iterdir())[:2]
    jpeg = tmp_path / "photo.jpg"
    Image.open(good[0]).convert("RGB").save(jpeg)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [
        str(good[0]),
        str(broken),
        str(good[1]),
        str(jpeg),
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--out",
        str(tmp_path / "out"),
        *"--score-thresh 0.0 --device cpu".split(),
    ]
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1
    assert (
        stderr.strip().startswith(f"error: {broken}: not a readable image (") and len(stderr.strip().splitlines()) == 1
    )
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(good[0]), str(good[1]), str(jpeg)]
    for path in (good[0], good[1], jpeg):
        drawn = Image.open(tmp_path / "out" / f"{path.stem}.png")
        assert drawn.size == Image.open(path).size and drawn.mode == "RGB"
    assert all(set(d) == {"label", "category_id", "score", "box"} for line in lines for d in line["detections"])
