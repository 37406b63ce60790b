import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lean.cli import run
from lean.errors import LeanError
from lean.synthetic import synthesize
from lean.targets import compact_instance_map

REAL_DATA = os.environ.get("LEAN_PENNFUDAN")
# The small model's flags for lean.train. On the CPU wherever a GPU is at hand too: resume equality is a CPU
# promise (CUDA's kernels are not all deterministic).
SMALL = "--backbone mobilenet_v3_fpn --weights none --min-size 96 --max-size 160 --device cpu".split()


def write_pennfudan(root, examples):
    """Write (name, RGB image, id map) examples as a PennFudan folder; returns root."""
    root = Path(root)
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    for name, image, id_map in examples:
        Image.fromarray(image).save(root / "PNGImages" / f"{name}.png")
        Image.fromarray(id_map).save(root / "PedMasks" / f"{name}_mask.png")
    return root


@pytest.fixture
def small_folder(tmp_path):
    """Six synthetic examples written as PNG files, PennFudan style."""
    examples = [(f"Ped{i:05d}", *synthesize(7, i)) for i in range(6)]
    return write_pennfudan(tmp_path / "PennFudanPed", examples)


def cli(main, argv, capsys):
    """Run a command's main in-process as its `python -m` entry would; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


class ArraySource:
    """Examples held in memory: the smallest thing with a source's interface."""

    kind = "arrays"

    def __init__(self, examples, fail_at=None, failure=LeanError):
        self.examples, self.fail_at, self.failure = examples, fail_at, failure
        self.names = [f"ex{i}" for i in range(len(examples))]

    def __len__(self):
        return len(self.examples)

    def params(self):
        return {"source": self.kind}

    def sizes(self):
        return np.array([image.shape[:2] for image, _ in self.examples], dtype=np.int64)

    def load(self, i):
        if i == self.fail_at:
            raise self.failure(f"{self.names[i]}: made to fail")
        image, id_map = self.examples[i]
        return image, compact_instance_map(id_map), hashlib.sha256(image.tobytes()).digest()
