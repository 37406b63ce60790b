"""COCO box and mask AP with pycocotools, ground truth straight from the cache.

`coco_eval(cache, indices, predictions)` scores predictions in torchvision's
output format; `predict_split` runs a model over cache images to make them;
`evaluate` does both. `python -m lean.evaluate --checkpoint PATH` evaluates a
trained run.

Ground truth follows the tutorial's references/detection conventions, so
the numbers compare with its log: boxes [x0, y0, x1 - x0, y1 - y0] from the
cached (inclusive) boxes, area and iscrowd as cached, one category (person,
id 1), annotation ids from 1, segmentation as RLE of the instance masks.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lean import checkpoint
from lean.cache import Cache
from lean.cli import Parser, add_device_argument, check_device, run
from lean.errors import LeanError
from lean.files import check_output, json_or_none, same_file, write_atomically
from lean.loader import Loader
from lean.plot import EVALUATION_PLOTS, draw_evaluation, drawn_by_evaluation
from lean.progress import Progress
from lean.sampling import split_indices
from lean.speed import configure_process

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
KINDS = ("bbox", "segm")


def _rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def ground_truth(cache, indices):
    """A pycocotools COCO object for the images `indices` of `cache`, built without decoding a pixel."""
    images, annotations = [], []
    for index in indices:
        height, width = (int(side) for side in cache.sizes[index])
        images.append({"id": int(index), "height": height, "width": width})
        fields = cache.instance_targets(index)
        masks = cache.masks(index) if cache.has_masks else [None] * len(fields["boxes"])
        for box, area, label, crowd, mask in zip(
            fields["boxes"], fields["area"], fields["labels"], fields["iscrowd"], masks
        ):
            x0, y0, x1, y1 = box.tolist()
            annotation = {
                "id": len(annotations) + 1, "image_id": int(index), "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd),
            }  # fmt: skip
            if mask is not None:  # a cache of boxes alone is scored by its boxes
                annotation["segmentation"] = _rle(mask)
            annotations.append(annotation)
    categories = [{"id": label, "name": name} for label, name in enumerate(cache.classes, start=1)]
    return _coco({"images": images, "annotations": annotations, "categories": categories})


def _coco(dataset):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index..." is noise here
        coco.createIndex()
    return coco


def detections(indices, predictions):
    """pycocotools result dicts from torchvision-format predictions: xywh boxes, RLE masks thresholded at 0.5."""
    results = []
    for index, prediction in zip(indices, predictions):
        boxes = prediction["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = prediction["scores"].detach().float().cpu().numpy()
        labels = prediction["labels"].detach().cpu().numpy()
        masks = _rles(prediction["masks"]) if "masks" in prediction else None
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            result = {
                "image_id": int(index),
                "category_id": int(labels[k]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(scores[k]),
            }
            if masks is not None:
                result["segmentation"] = masks[k]
            results.append(result)
    return results


def _rles(masks):
    """The RLE of each of N x 1 x H x W masks cut at 0.5, encoded by pycocotools in one call."""
    cut = (masks.detach() > 0.5)[:, 0].cpu().numpy()
    if not len(cut):
        return []
    encoded = mask_util.encode(np.asfortranarray(cut.transpose(1, 2, 0).astype(np.uint8)))
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")
    return encoded


def coco_eval(cache, indices, predictions, verbose=True, metrics=KINDS):
    """{"bbox": stats, "segm": stats} (those of `metrics`), each stats dict holding the 12 COCO numbers by name
    and as "stats", and "per_class": {class name: {"AP": ..., "AP50": ...}} (-1 for a class with no ground
    truth here).

    `predictions` are one torchvision output dict per index, in the order of `indices`.
    """
    indices = [int(index) for index in indices]
    if len(predictions) != len(indices):
        raise ValueError(f"{len(predictions)} predictions for {len(indices)} images")
    results = detections(indices, predictions)
    report, text = score(ground_truth(cache, indices), cache.classes, indices, results, metrics)
    if verbose:
        print(text)
    return report


def score(truth, classes, indices, results, metrics=KINDS):
    """(report, text): coco_eval's report of pycocotools `results` against `truth` (a COCO of `indices`), and
    the summaries and per-class table as coco_eval prints them."""
    report, lines = {}, []
    for kind in metrics:
        if kind == "segm" and results and "segmentation" not in results[0]:
            continue
        # Each kind gets its own results, as the references make them: boxes alone, or masks alone
        # (then pycocotools takes the area and box from the mask).
        other = "segmentation" if kind == "bbox" else "bbox"
        kind_results = [{key: value for key, value in result.items() if key != other} for result in results]
        with contextlib.redirect_stdout(io.StringIO()):
            found = truth.loadRes(kind_results) if kind_results else _coco({**truth.dataset, "annotations": []})
            evaluator = COCOeval(truth, found, kind)
            evaluator.params.imgIds = indices
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()) as summary:
            evaluator.summarize()
        lines += [f"IoU metric: {kind}", summary.getvalue().rstrip("\n")]
        stats = [float(value) for value in evaluator.stats]
        report[kind] = {
            **dict(zip(STAT_NAMES, stats)),
            "stats": stats,
            "per_class": per_class(evaluator, classes),
            "pr_curves": pr_curves(evaluator, classes),
        }
        if kind == "bbox":
            report[kind]["confusion"] = confusion(truth, kind_results, indices, classes)
    return report, "\n".join([*lines, class_table(report)])


def per_class(evaluator, classes):
    """{name: {"AP": ..., "AP50": ...}} from an accumulated COCOeval, as detectron2 reads its precision array."""
    precision = evaluator.eval["precision"]  # IoU thresholds x recall x class x area range x max detections
    table = {}
    for k, name in enumerate(classes):
        values = {"AP": precision[:, :, k, 0, -1], "AP50": precision[0, :, k, 0, -1]}
        table[name] = {key: float(v[v > -1].mean()) if (v > -1).any() else -1.0 for key, v in values.items()}
    return table


def pr_curves(evaluator, classes):
    """{name: {"recall": COCO's 101 recall points, "iou50": the precision at each at IoU 0.5, "iou50_95": its mean
    over the ten IoU thresholds}}, read from pycocotools' own precision array (all areas, 100 detections), so
    each curve's mean is the AP printed. -1 where the class has no ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # IoU thresholds x recall x class
    curves = {}
    for k, name in enumerate(classes):
        over = precision[:, :, k]
        valid = over > -1
        mean = np.where(valid.any(0), (over * valid).sum(0) / np.maximum(valid.sum(0), 1), -1.0)
        curves[name] = {
            "recall": evaluator.params.recThrs.tolist(),
            "iou50": over[0].tolist(),
            "iou50_95": mean.tolist(),
        }
    return curves


def confusion(truth, results, indices, classes, iou=0.5, score_thresh=0.25):
    """The confusion matrix of detections (score at least `score_thresh`) against the ground truth at box IoU `iou`:
    rows are the predicted class, columns the true one, the last of each background. Each image's detections,
    best score first, take the unmatched true box they overlap most (whatever its class); a detection that
    takes none is a false positive (background column), a true box no detection takes is missed (background
    row); crowd regions are left out. With each class's precision and recall from the matrix."""
    count = len(classes)
    matrix = np.zeros((count + 1, count + 1), dtype=np.int64)
    found = {}
    for result in results:
        if result["score"] >= score_thresh:
            found.setdefault(result["image_id"], []).append(result)
    for index in indices:
        truths = [a for a in truth.imgToAnns[int(index)] if not a["iscrowd"]]
        taken = np.zeros(len(truths), dtype=bool)
        here = found.get(int(index), [])
        overlaps = _box_iou([result["bbox"] for result in here], [annotation["bbox"] for annotation in truths])
        for d in np.argsort([-result["score"] for result in here], kind="stable"):
            free = np.where(taken, -1.0, overlaps[d])
            g = int(free.argmax()) if len(truths) else -1
            predicted = here[d]["category_id"] - 1
            if g >= 0 and free[g] >= iou:
                taken[g] = True
                matrix[predicted, truths[g]["category_id"] - 1] += 1
            else:
                matrix[predicted, count] += 1
        for g in np.flatnonzero(~taken):
            matrix[count, truths[g]["category_id"] - 1] += 1
    right = np.diag(matrix)[:count]
    precision = right / np.maximum(matrix[:count].sum(1), 1)
    recall = right / np.maximum(matrix[:, :count].sum(0), 1)
    return {
        "iou": iou, "score_thresh": score_thresh, "labels": [*classes, "background"], "matrix": matrix.tolist(),
        "per_class": {
            name: {"precision": float(p), "recall": float(r)} for name, p, r in zip(classes, precision, recall)
        },
    }  # fmt: skip


def _box_iou(a, b):
    """IoU of every xywh box of `a` with every one of `b`."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y1 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter
    return inter / np.maximum(union, 1e-12)


def class_table(report):
    """The per-class AP and AP50 of every kind in `report`, as a text table."""
    kinds = [kind for kind in KINDS if kind in report]
    names = list(report[kinds[0]]["per_class"]) if kinds else []
    width = max([len("class"), *map(len, names)])
    header = f"{'class':<{width}}" + "".join(f"  {kind + ' ' + stat:>9}" for kind in kinds for stat in ("AP", "AP50"))
    rows = [
        f"{name:<{width}}"
        + "".join(f"  {report[kind]['per_class'][name][stat]:>9.3f}" for kind in kinds for stat in ("AP", "AP50"))
        for name in names
    ]
    return "\n".join([header, *rows])


def in_source_terms(cache, results):
    """`detections` with the source's own image and category ids: COCO's results format for the source file."""
    return [{**result, "image_id": int(cache.source_ids[result["image_id"]]),
             "category_id": int(cache.category_ids[result["category_id"] - 1])} for result in results]  # fmt: skip


def on_host(outputs):
    """A batch's torchvision output dicts on the CPU, boxes, scores and labels in one copy and every mask in
    another; masks cut at 0.5 where they are, as every use of them here cuts them (a bool mask is a quarter
    of a float one to copy, and a bf16 mask is cut as its float32 value would be)."""
    counts = [len(output["scores"]) for output in outputs]
    columns = [[o["boxes"].float(), o["scores"].float()[:, None], o["labels"].float()[:, None]] for o in outputs]
    packed = torch.cat([torch.cat(parts, 1) for parts in columns]).cpu()  # labels as floats: exact below 2**24
    host = [{"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5].long()} for p in packed.split(counts)]
    if "masks" in outputs[0]:
        cut = [output["masks"] > 0.5 for output in outputs]
        flat = torch.cat([mask.flatten() for mask in cut]).cpu().split([mask.numel() for mask in cut])
        for prediction, mask, values in zip(host, cut, flat):
            prediction["masks"] = values.reshape(mask.shape)
    return host


@torch.no_grad()
def predict_split(model, cache, indices, device, amp_dtype=None, batch_size=2):
    """torchvision predictions (on the CPU, masks cut at 0.5: `on_host`) for `indices`, in that order."""
    model.eval()
    loader = Loader(cache, batch_size, shuffle=False, device=device, indices=indices, train=False, dtype=torch.uint8)
    progress = Progress(len(indices), "evaluate", rate="images/s")
    predictions = []
    for images, _ in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        predictions += on_host(outputs)
        progress.update(len(images))
    return predictions


def predict(model, cache, indices, device, amp_dtype=None):
    """predict_split with the model run eager (compiled, each test image's shape would be one more graph, costing
    more than the images take) and left in the mode it came in."""
    training = model.training
    with torch.compiler.set_stance("force_eager"):
        predictions = predict_split(model, cache, indices, device, amp_dtype)
    model.train(training)
    return predictions


def evaluate(model, cache, indices, device, amp_dtype=None, verbose=True, metrics=KINDS):
    """coco_eval of `model`'s predictions for `indices` (`predict`)."""
    return coco_eval(cache, indices, predict(model, cache, indices, device, amp_dtype), verbose, metrics)


def split_of(cache, name, seed, test_size):
    """The cache indices of the split `name`: all of them, or the run's train or test part."""
    if name == "all":
        return np.arange(len(cache))
    try:
        train, test = split_indices(len(cache), seed, test_size)
    except ValueError as error:
        raise LeanError(f"--split {name}: {error}; --split all evaluates every image") from None
    return {"train": train, "test": test}[name]


def parse_args(argv):
    parser = Parser(prog="python -m lean.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a lean checkpoint (last.pt or best.pt)")
    parser.add_argument("--cache", type=Path, help="default: the run's --val-cache, else the cache it trained on")
    parser.add_argument(
        "--split", choices=["test", "train", "all"], help="default: the run's held-out images, or all of another cache"
    )
    add_device_argument(parser)
    parser.add_argument("--json", type=Path, help="write the stats, per class too, and the source image ids here")
    parser.add_argument("--results", type=Path, help="write the detections here in COCO's results format")
    parser.add_argument("--plots", type=Path, help="draw pr_curves.png and confusion_matrix.png in this folder")
    args = parser.parse_args(argv)
    if args.plots is not None and args.plots.exists() and not args.plots.is_dir():
        parser.error(f"argument --plots: {args.plots} is a file, not a folder")
    check_device(parser, args.device)
    for flag, path in (("--json", args.json), ("--results", args.results)):  # before the work, not after it
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            parser.error(f"argument {flag}: {path} cannot be written (a folder, or in a folder that does not exist)")
    return args


def main(argv=None):
    args = parse_args(argv)
    configure_process()
    device = torch.device(args.device)
    model, spec, config = checkpoint.load_model(args.checkpoint, device)
    path = args.cache or config.val_cache or config.cache
    if args.json and args.results and same_file(args.json, args.results):
        raise LeanError(f"--json and --results: both name {args.json}; name two files")
    check_output(args.json, "--json", (args.checkpoint, path), lambda p: isinstance(json_or_none(p), dict))
    check_output(args.results, "--results", (args.checkpoint, path), lambda p: isinstance(json_or_none(p), list))
    for name in EVALUATION_PLOTS if args.plots else ():
        check_output(args.plots / name, "--plots", (args.checkpoint, path), drawn_by_evaluation)
    cache = Cache(path)
    if cache.classes != spec.class_names:
        raise LeanError(f"{path}: its classes {list(cache.classes)} are not the checkpoint's {list(spec.class_names)}")
    split = args.split or ("test" if path == config.cache else "all")
    indices = split_of(cache, split, config.seed, config.test_size)
    predictions = predict_split(model, cache, indices, device)
    metrics = spec.metrics if cache.has_masks else ("bbox",)  # a cache of boxes alone has no masks to score
    report = coco_eval(cache, indices, predictions, metrics=metrics)
    if args.results:
        results = json.dumps(in_source_terms(cache, detections(indices, predictions)))
        write_atomically(args.results, lambda temporary: temporary.write_text(results))
    if args.json:
        stats = json.dumps({**report, "image_ids": cache.source_ids[indices].tolist()}, indent=1)
        write_atomically(args.json, lambda temporary: temporary.write_text(stats))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        draw_evaluation(report, args.plots)
    print(json.dumps({kind: round(values["AP"], 4) for kind, values in report.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
