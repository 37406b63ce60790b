import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lean.cli import run
from lean.errors import LeanError
from lean.example import from_instance_map
from lean.synthetic import synthesize

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


def wait_for(predicate, timeout=60):
    """True as soon as predicate() holds, False after `timeout` seconds: tests that race a process wait for a sign
    that the work is under way, never for a fixed delay, so they pass on a machine of any speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def bytes_on_disk(path):
    """Bytes the file at `path` occupies on disk (0 if it is not there): a build preallocates its pixels sparsely,
    so this grows only as its workers write images."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def build_writing(folder, name, least=1 << 20):
    """A predicate for wait_for: a build of `folder/name` is writing pixels (its temporary holds `least` bytes)."""
    return lambda: any(bytes_on_disk(path) >= least for path in Path(folder).glob(f".{name}.*.tmp"))


@pytest.fixture
def small_folder(tmp_path):
    """Six synthetic examples written as PNG files, PennFudan style."""
    examples = [(f"Ped{i:05d}", *synthesize(7, i)) for i in range(6)]
    return write_pennfudan(tmp_path / "PennFudanPed", examples)


def exit_status(main, argv):
    """Run a command's main in-process as its `python -m` entry would; returns its exit status (output not captured:
    for module-scoped fixtures, which capsys cannot serve)."""
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    return exited.value.code


def cli(main, argv, capsys):
    """Run a command's main in-process as its `python -m` entry would; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


class ArraySource:
    """Examples held in memory: the smallest thing with a source's interface."""

    kind = "arrays"
    classes = ("person",)
    category_ids = (1,)
    box_end = "inclusive"

    def __init__(self, examples, fail_at=None, failure=LeanError):
        self.examples, self.fail_at, self.failure = examples, fail_at, failure
        self.names = [f"ex{i}" for i in range(len(examples))]
        self.skipped = {}

    def __len__(self):
        return len(self.examples)

    def params(self):
        return {"source": self.kind}

    def source_ids(self):
        return list(range(len(self)))

    def sizes(self):
        return np.array([image.shape[:2] for image, _ in self.examples], dtype=np.int64)

    def load(self, i, encoded=False):
        if i == self.fail_at:
            raise self.failure(f"{self.names[i]}: made to fail")
        image, id_map = self.examples[i]
        return from_instance_map(id_map, hashlib.sha256(image.tobytes()).digest(), pixels=image)


class ExampleSource(ArraySource):
    """lean.example.Examples held in memory, masks free to overlap; boxes exclusive, as COCO's."""

    box_end = "exclusive"
    classes = ("a", "b", "c")
    category_ids = (1, 2, 3)

    def sizes(self):
        return np.array([example.size for example in self.examples], dtype=np.int64)

    def load(self, i, encoded=False):
        return self.examples[i]


def overlapping_example(seed, height=24, width=32, count=4):
    """An Example of `count` rectangles that overlap one another, with their exclusive boxes."""
    from lean.example import Example

    rng = np.random.default_rng(seed)
    masks = np.zeros((count, height, width), np.uint8)
    boxes = np.zeros((count, 4), np.float32)
    for k in range(count):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        y1, x1 = rng.integers(y0 + 2, height + 1), rng.integers(x0 + 2, width + 1)
        masks[k, y0:y1, x0:x1] = 1
        boxes[k] = x0, y0, x1, y1
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    area = masks.sum((1, 2)).astype(np.float32)
    labels = rng.integers(1, 4, count).astype(np.int64)
    digest = hashlib.sha256(pixels.tobytes() + masks.tobytes()).digest()
    return Example((height, width), masks, boxes, area, labels, np.zeros(count, np.int64), digest, pixels=pixels)
