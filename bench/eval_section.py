"""The eval section: scoring the 50 test images the references' way against lean.evaluate, and on CUDA the
tutorial's script's whole evaluation against lean's."""

import numpy as np
import torch

from bench.common import copied, median_seconds, scratch_cache
from bench.seed_pipeline import seed_model_from_scratch
from lean.model import ModelSpec, create_model
from lean.speed import Speed


def eval_section(root, repeats, scratch):
    """Seconds to score the 50 test images (bbox + segm) the references' way against lean.evaluate, same predictions."""
    from bench.seed_pipeline import seed_evaluate
    from lean.evaluate import coco_eval
    from lean.sampling import split_indices

    cache = scratch_cache(root, scratch)
    _, test = split_indices(len(cache), seed=0)
    rng = np.random.default_rng(0)
    predictions = []  # the ground truth, jittered: the same detections for both sides
    for i in test:
        target = cache.target(i)
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 4, target["boxes"].shape)).float()
        masks = torch.roll(target["masks"], 2, dims=2)[:, None].float()
        predictions.append(
            {
                "boxes": boxes,
                "scores": torch.from_numpy(rng.random(len(boxes))).float(),
                "labels": target["labels"],
                "masks": masks,
            }
        )
    seed_s = median_seconds(lambda: seed_evaluate(root, test, predictions), repeats)
    lean_s = median_seconds(lambda: coco_eval(cache, test, predictions, verbose=False), repeats)
    seed_stats = seed_evaluate(root, test, predictions)
    lean_stats = coco_eval(cache, test, predictions, verbose=False)
    same = all(np.allclose(seed_stats[kind], lean_stats[kind]["stats"], atol=1e-4) for kind in ("bbox", "segm"))
    rows = [
        (
            "eval",
            f"score {len(test)} test images, seconds (stats identical: {same})",
            "references' CocoEvaluator approach",
            seed_s,
            lean_s,
            seed_s / lean_s,
        )
    ]
    if torch.cuda.is_available():
        rows.append(evaluation_on_device(root, repeats, scratch, torch.device("cuda")))
    return rows


def evaluation_on_device(root, repeats, scratch, device, min_size=800, max_size=1333):
    """Seconds to evaluate the 50 test images on `device`, predicting included: the tutorial's script's way
    (bench.seed_job.evaluate) against lean.evaluate.evaluate with lean's CUDA defaults, both from the same
    random init in the layout `--weights none` gives (a random model proposes the most regions: a worst case)."""
    from bench.seed_job import evaluate as seed_job_evaluate
    from bench.seed_job import loaders
    from lean.evaluate import evaluate

    torch.manual_seed(0)
    reference = seed_model_from_scratch(min_size, max_size)
    spec = ModelSpec("resnet50_fpn", ("person",), min_size, max_size, pretrained=False)
    speed = Speed.for_device(device)
    model = create_model(spec, copied(reference.state_dict()), speed, device)
    reference.to(device)
    _, test_loader, test = loaders(root, 50, 0)
    cache = scratch_cache(root, scratch)  # its images are the PNGs' in sorted order, as the seed's Dataset lists them
    seed_s = median_seconds(lambda: seed_job_evaluate(reference, test_loader, test, root, device), repeats)
    lean_s = median_seconds(lambda: evaluate(model, cache, test, device, speed.amp, verbose=False), repeats)
    measure = f"evaluate {len(test)} test images on {device.type}, predicting included, {min_size}/{max_size}, seconds"
    return ("eval", measure, "the tutorial's script (bench.seed_job)", seed_s, lean_s, seed_s / lean_s)
