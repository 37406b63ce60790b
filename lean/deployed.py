"""Models lean.export wrote, read back and run: ONNX files by onnxruntime, TorchScript files by torch.jit.

Each file carries the ModelSpec it was exported from (ONNX metadata, a TorchScript attribute), so running it
needs nothing else, and each takes one uint8 RGB image (3 x H x W, any size) and gives its detections as
lean's model does: boxes in the image's pixels, labels, scores and, for a Mask R-CNN, masks pasted at the
image's size.
"""

import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path

import torch

from lean.errors import LeanError, reason
from lean.model import ModelSpec

SPEC_KEY = "lean_model_spec"  # the ONNX metadata entry and the TorchScript attribute holding the spec
ONNX_PACKAGES = ("onnx", "onnxruntime")  # torch's TorchScript-based exporter needs no onnxscript
INSTALL_ONNX = "pip install onnx onnxruntime (lean's extra: pip install -e '.[export]')"


def spec_json(spec):
    return json.dumps(dataclasses.asdict(spec))


def read_spec(text, path):
    """The ModelSpec in an exported file's `text`, or one line saying the file is not lean's."""
    try:
        return ModelSpec(**json.loads(text))
    except (TypeError, ValueError, LeanError):
        raise LeanError(f"{path}: not a model lean.export wrote (no model spec inside)") from None


def missing_onnx_packages():
    """The packages ONNX export and its check need that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


class OnnxModel:
    """An ONNX file lean.export wrote, run by onnxruntime on the CPU."""

    def __init__(self, path):
        if importlib.util.find_spec("onnxruntime") is None:
            raise LeanError(f"{path}: running an ONNX model needs onnxruntime: {INSTALL_ONNX}")
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types, none of them exported under one name
            raise LeanError(f"{path}: not an ONNX model onnxruntime can run ({reason(error)})") from None
        self.spec = read_spec(self.session.get_modelmeta().custom_metadata_map.get(SPEC_KEY), path)
        self.outputs = [output.name for output in self.session.get_outputs()]

    def __call__(self, images):
        return [
            {
                name: torch.from_numpy(value)
                for name, value in zip(self.outputs, self.session.run(None, {"image": image.cpu().numpy()}))
            }
            for image in images
        ]


class TorchScriptModel:
    """A TorchScript file lean.export wrote, run by torch.jit on `device`."""

    def __init__(self, path, device="cpu"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; its files still load
                self.module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as error:
            raise LeanError(f"{path}: not a TorchScript file torch.jit can load ({reason(error)})") from None
        self.spec = read_spec(getattr(self.module, SPEC_KEY, None), path)
        self.device = device

    @torch.no_grad()
    def __call__(self, images):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "RCNN always returns a (Losses, Detections) tuple"
            outputs = [self.module(image.to(self.device)) for image in images]
        return [{key: value.cpu() for key, value in output.items()} for output in outputs]


def load_deployed(path, device="cpu"):
    """The exported model at `path`, by its suffix: .onnx is ONNX, anything else TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise LeanError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        if device != "cpu":
            raise LeanError(f"{path}: lean runs ONNX files with onnxruntime's CPU build; use --device cpu")
        return OnnxModel(path)
    return TorchScriptModel(path, device)
