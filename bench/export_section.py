"""The export section: latency an image of lean's eager model, its TorchScript file and its ONNX file run by
onnxruntime, side by side on the CPU, and the files' sizes."""

import math

import torch

from bench.common import median_seconds, scratch_cache
from lean.deployed import OnnxModel, TorchScriptModel
from lean.export import Deployable, export_onnx, export_torchscript
from lean.model import ModelSpec, create_model, create_torchvision_model


def export_section(root, repeats, scratch, tasks, min_size=800, max_size=1333):
    """Rows for each task: milliseconds an image of the exported files against the eager model, at the model's
    working size, and the files' MiB. The tutorial's resnet50_fpn from one random init (no COCO weights here):
    the same weights for all three, and a random model keeps its full 100 detections, a worst case for masks."""
    image = torch.from_numpy(scratch_cache(root, scratch).image(0).copy()).permute(2, 0, 1).contiguous()
    rows = []
    for task in tasks:
        spec = ModelSpec("resnet50_fpn", ("person",), min_size, max_size, pretrained=False, task=task)
        rows += _task_rows(spec, image, repeats, scratch)
    return rows


@torch.no_grad()
def _task_rows(spec, image, repeats, scratch):
    torch.manual_seed(0)
    model = create_model(spec).eval()
    deployable = Deployable(create_torchvision_model(spec, model.state_dict()), spec)
    paths = {"TorchScript": scratch / f"{spec.task}.pt", "onnxruntime": scratch / f"{spec.task}.onnx"}
    export_torchscript(deployable, image, paths["TorchScript"])
    export_onnx(deployable, image, paths["onnxruntime"])
    runners = {"TorchScript": TorchScriptModel(paths["TorchScript"]), "onnxruntime": OnnxModel(paths["onnxruntime"])}
    eager_ms = 1000 * median_seconds(lambda: model([image]), repeats)
    height, width = image.shape[1:]
    where = f"{spec.task}, resnet50_fpn at {spec.min_size}/{spec.max_size}, a {height}x{width} photo, CPU"
    rows = []
    for name, runner in runners.items():
        ms = 1000 * median_seconds(lambda runner=runner: runner([image]), repeats)
        rows.append(("export", f"{where}: {name}, ms an image", "lean's eager model", eager_ms, ms, eager_ms / ms))
    for name, path in paths.items():
        size = path.stat().st_size / 2**20
        rows.append(("export", f"{spec.task} file for {name}, MiB", "-", math.nan, size, math.nan))
    return rows
