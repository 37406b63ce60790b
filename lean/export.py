"""python -m lean.export CHECKPOINT --onnx FILE --torchscript FILE: the trained model as one file to deploy,
checked against the model.

The whole model goes into the file, preprocessing included: it takes one uint8 RGB image (3 x H x W, any
height and width; one image a call, as torchvision's detection models export) and returns its boxes in the
image's pixels, labels, scores and, for a Mask R-CNN, masks pasted at the image's size, as lean.predict's
model does. The class names and category ids travel inside (ONNX metadata, TorchScript attributes):
`python -m lean.predict --model FILE` draws with nothing else. The model exported is torchvision's own,
with the checkpoint's weights: lean's faster parts are for training.

Before a file is kept it is run beside the checkpoint's model on a few images (the run's cache's first
ones, or those of --images FOLDER), one of them turned to another aspect ratio and a blank one added: the
same detections above --score-thresh, boxes within 0.5 px, scores within 1e-3, masks with an IoU of at
least 0.99 (where the two boxes are one region). A mismatch is one line naming the image and what differs,
and no file is left behind.
"""

import argparse
import functools
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from lean.cache import Cache
from lean.checkpoint import load, model_spec, run_config
from lean.cli import Parser, run
from lean.deployed import (
    INSTALL_ONNX,
    SPEC_KEY,
    OnnxModel,
    TorchScriptModel,
    load_deployed,
    missing_onnx_packages,
    spec_json,
)
from lean.errors import LeanError, reason
from lean.files import check_output, same_file, write_atomically
from lean.model import create_model, create_torchvision_model
from lean.predict import expand, fit, read_image
from lean.speed import configure_process

CHECKED_IMAGES = 3  # of the cache or folder; a turned one and a blank one come on top
BOX_TOLERANCE = 0.5  # pixels
SCORE_TOLERANCE = 1e-3
MASK_IOU = 0.99
# Boxes further apart than this come from near-tied proposals (the model's own box moves as far for noise of
# 1e-5 in the image): their masks are pasted a pixel apart, and their boxes are what is compared.
SAME_REGION = 0.05
OPSET = 17
OUTPUTS = ("boxes", "labels", "scores", "masks")


class Deployable(torch.nn.Module):
    """torchvision's model behind one uint8 image in and its detections out, its spec in attributes."""

    def __init__(self, model, spec):
        super().__init__()
        self.model = model
        setattr(self, SPEC_KEY, spec_json(spec))
        self.class_names = list(spec.class_names)
        self.category_ids = list(spec.category_ids)
        self.eval()  # the ONNX exporter leaves a module in the mode it found it in

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.model([image.float() / 255])
        if isinstance(output, tuple):  # scripted, torchvision's detectors return (losses, detections)
            return output[1][0]
        return output[0]


def quiet(export):
    """`export`, its exporter's tracer and deprecation warnings (for torchvision's and torch's authors) unsaid."""

    @functools.wraps(export)
    def quietly(*args):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            export(*args)

    return quietly


@quiet
def export_onnx(deployable, example, path):
    import onnx

    outputs = list(OUTPUTS if "masks" in deployable(example) else OUTPUTS[:3])
    dynamic = {"image": {1: "height", 2: "width"}} | {name: {0: "detections"} for name in outputs}
    if "masks" in outputs:
        dynamic["masks"] |= {2: "height", 3: "width"}
    buffer = io.BytesIO()
    torch.onnx.export(
        deployable, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
        output_names=outputs, dynamic_axes=dynamic,
    )  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {SPEC_KEY: getattr(deployable, SPEC_KEY), "class_names": ",".join(deployable.class_names)}
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


@quiet
def export_torchscript(deployable, example, path):
    torch.jit.save(torch.jit.script(deployable), str(path))


FORMATS = {"ONNX": (export_onnx, OnnxModel), "TorchScript": (export_torchscript, TorchScriptModel)}


def difference(expected, got, score_thresh):
    """What differs between two predictions for one image, in a few words, or None where they agree: the
    same detections above `score_thresh` (those within the score tolerance of it may fall either side),
    boxes within BOX_TOLERANCE, scores within SCORE_TOLERANCE, and where the boxes are one region, masks
    with an IoU of at least MASK_IOU."""
    unmatched = [i for i in range(len(got["scores"])) if got["scores"][i] >= score_thresh - SCORE_TOLERANCE]
    for i in torch.nonzero(expected["scores"] >= score_thresh).flatten().tolist():
        label, score, box = int(expected["labels"][i]), float(expected["scores"][i]), expected["boxes"][i]
        fits = [
            j for j in unmatched
            if int(got["labels"][j]) == label
            and abs(float(got["scores"][j]) - score) <= SCORE_TOLERANCE
            and float((got["boxes"][j] - box).abs().max()) <= BOX_TOLERANCE
        ]  # fmt: skip
        if not fits:
            return f"no detection matches label {label} with score {score:.4f} at {_rounded(box)}"
        j = min(fits, key=lambda j: float((got["boxes"][j] - box).abs().max()))
        unmatched.remove(j)
        if "masks" in expected and float((got["boxes"][j] - box).abs().max()) <= SAME_REGION:
            iou = mask_iou(expected["masks"][i], got["masks"][j])
            if iou < MASK_IOU:
                return f"the mask of label {label} with score {score:.4f} overlaps the model's by IoU {iou:.3f}"
    extra = [j for j in unmatched if got["scores"][j] >= score_thresh + SCORE_TOLERANCE]
    if extra:
        j = extra[0]
        return f"an extra detection, label {int(got['labels'][j])} score {float(got['scores'][j]):.4f}"
    return None


def mask_iou(a, b):
    a, b = a >= 0.5, b >= 0.5
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _rounded(box):
    return [round(float(v), 1) for v in box]


def check_images(folder, cache_path):
    """(name, 3 x H x W uint8 image) to check an export on: the folder's first images, or the cache's, one of
    them turned to another aspect ratio and a blank one added."""
    if folder is not None:
        images = [(str(path), read_image(path)) for path in expand([folder])[:CHECKED_IMAGES]]
    elif cache_path is not None and Path(cache_path).is_file():
        cache = Cache(cache_path)
        count = min(CHECKED_IMAGES, len(cache))
        images = [
            (f"{cache_path} image {i}", torch.from_numpy(np.array(cache.image(i))).permute(2, 0, 1))
            for i in range(count)
        ]
    else:
        raise LeanError(f"the run's cache {cache_path} is not here to check the export on; give --images FOLDER")
    name, first = images[0]
    height, width = first.shape[-2:]
    turned = first.transpose(1, 2) if height != width else first[:, :, : max(1, width // 2)]
    blank = torch.full_like(first, 114)
    return [*images, (f"{name}, turned", turned.contiguous()), ("a blank grey image", blank)]


def check(exported, model, spec, images, score_thresh):
    """One line naming the first image where the exported model's detections are not the model's."""
    for name, image in images:
        image = fit(image, spec)[0]
        with torch.no_grad():
            expected = model([image])[0]
        problem = difference(expected, exported([image])[0], score_thresh)
        if problem:
            raise LeanError(f"{name}: {problem}")


def parse_args(argv):
    parser = Parser(
        prog="python -m lean.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a lean checkpoint (last.pt, best.pt)")
    parser.add_argument("--onnx", type=Path, help=f"write the model here as ONNX (opset {OPSET})")
    parser.add_argument("--torchscript", type=Path, help="write the model here as TorchScript")
    parser.add_argument(
        "--images", type=Path, help="check the export on this folder's images (default: the run's cache)"
    )
    parser.add_argument("--score-thresh", type=float, default=0.5, help="detections compared: those above this")
    args = parser.parse_args(argv)
    if args.onnx is None and args.torchscript is None:
        parser.error("give --onnx FILE, --torchscript FILE or both")
    if args.onnx and args.torchscript and same_file(args.onnx, args.torchscript):
        parser.error(f"--onnx and --torchscript name the same file, {args.onnx}")
    if args.onnx and missing_onnx_packages():
        parser.error(f"argument --onnx: needs {', '.join(missing_onnx_packages())}: {INSTALL_ONNX}")
    for flag, path in (("--onnx", args.onnx), ("--torchscript", args.torchscript)):
        if path is not None:
            check_target(flag, path, args.checkpoint)
    return args


def check_target(flag, path, checkpoint):
    """One line, before any work, where `path` cannot take an export: no folder there, a folder we cannot write
    in, the checkpoint itself, or a file that is not an export of lean's."""
    folder = path.parent
    if path.is_dir():
        raise LeanError(f"{flag} {path}: is a folder; name a file")
    if not folder.is_dir():
        raise LeanError(f"{flag} {path}: no folder {folder}")
    probe = folder / f".{path.name}.{os.getpid()}.probe"  # the test that holds for root and read-only mounts too
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise LeanError(f"{flag} {path}: cannot write in {folder} ({error.strerror or reason(error)})") from None
    check_output(path, flag, inputs=(checkpoint,), ours=_exported_here)


def _exported_here(path):
    try:
        load_deployed(path)
    except LeanError:
        return False
    return True


def write_checked(path, what, deployable, example, checked):
    """Export `deployable` as `what` to `path` through a temporary that `checked(temporary)` must pass."""
    write, read = FORMATS[what]

    def write_temporary(temporary):
        try:
            write(deployable, example, temporary)
        except Exception as error:  # each exporter raises its own kinds; any of them is a model it cannot take
            raise LeanError(f"the model cannot be exported as {what}: {reason(error)}") from None
        try:
            checked(read(temporary))
        except LeanError as error:
            raise LeanError(f"the {what} file's detections are not the model's on {error}") from None

    write_atomically(path, write_temporary)


def main(argv=None):
    args = parse_args(argv)
    configure_process()
    state = load(args.checkpoint)
    spec = model_spec(state)
    model = create_model(spec, state["model"]).eval()
    deployable = Deployable(create_torchvision_model(spec, state["model"]), spec)
    images = check_images(args.images, run_config(state).cache)
    example = fit(images[0][1], spec)[0]

    def checked(exported):
        check(exported, model, spec, images, args.score_thresh)

    for what, path in (("ONNX", args.onnx), ("TorchScript", args.torchscript)):
        if path is None:
            continue
        try:
            write_checked(path, what, deployable, example, checked)
        except LeanError as error:
            raise LeanError(f"{spec.backbone} {spec.kind}: {error}") from None
        size = path.stat().st_size / 2**20
        print(
            f"wrote {path} ({what}, {size:.1f} MiB), its detections the model's on {len(images)} images",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    run(main)
