"""What the tests share: the suite's few built caches and trained runs (session-wide, built once, never written
to by a test), the small model's flags, fake sources, and helpers that run commands and wait for events."""

import contextlib
import hashlib
import http.server
import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lean.cache import Cache, build
from lean.cli import run
from lean.coco import CocoSource
from lean.errors import LeanError
from lean.example import from_instance_map
from lean.synthetic import SyntheticSource, synthesize
from lean.train import main as train_main
from tests.coco_files import annotation, dataset, polygon, write_coco

REAL_DATA = os.environ.get("LEAN_PENNFUDAN")
# The small model's flags for lean.train. On the CPU wherever a GPU is at hand too: resume equality is a CPU
# promise (CUDA's kernels are not all deterministic).
SMALL = "--backbone mobilenet_v3_fpn --weights none --min-size 96 --max-size 160 --device cpu".split()
QUICK = [*SMALL, "--test-size", "2", "--no-eval"]


def write_pennfudan(root, examples):
    """Write (name, RGB image, id map) examples as a PennFudan folder; returns root."""
    root = Path(root)
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    for name, image, id_map in examples:
        Image.fromarray(image).save(root / "PNGImages" / f"{name}.png")
        Image.fromarray(id_map).save(root / "PedMasks" / f"{name}_mask.png")
    return root


def loader_threads():
    """The Loader's background threads alive now."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("lean-loader")]


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
    masks = True

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

    def files(self):
        return []

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


# --- the suite's caches and runs: built once, read by every test that can use them -------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Ten synthetic images: the cache every test that trains or evaluates the small model uses."""
    return build(SyntheticSource(10, seed=4), tmp_path_factory.mktemp("tiny") / "tiny.h5", workers=0, progress=False)


@pytest.fixture(scope="session")
def run_dir(tiny, tmp_path_factory):
    """A run of the small model on `tiny`: two epochs, evaluated after each (last.pt, best.pt, metrics, curves)."""
    out = tmp_path_factory.mktemp("run")
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--epochs", "2", "--seed", "0", "--out", str(out)]
    assert exit_status(train_main, argv) == 0
    return out


@pytest.fixture(scope="session")
def trained_run(tiny, run_dir):
    """(the cache, the run folder) of `run_dir`."""
    return tiny, run_dir


@pytest.fixture(scope="session")
def short_run(tiny, tmp_path_factory):
    """(the cache, the run folder) of two iterations of the small model on `tiny`, evaluated once at the end."""
    out = tmp_path_factory.mktemp("short")
    argv = ["--cache", str(tiny), *SMALL, *"--test-size 2 --no-compile --max-iters 2 --out".split(), str(out)]
    assert exit_status(train_main, argv) == 0
    return tiny, out


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """23 synthetic images, opened: what the loader's tests batch."""
    return Cache(build(SyntheticSource(23, seed=5), tmp_path_factory.mktemp("c") / "c.h5", workers=0, progress=False))


@pytest.fixture(scope="session")
def photo_caches(tmp_path_factory):
    """(raw, encoded) caches of a COCO folder of five JPEGs and one PNG, two overlapping instances each."""

    folder = tmp_path_factory.mktemp("photos")
    names = [f"{k}.png" if k == 2 else f"sub/{k}.jpg" for k in range(6)]
    images = [{"id": k + 1, "file_name": name, "width": 48 + 8 * k, "height": 40} for k, name in enumerate(names)]
    overlapping = [(2 * k + j + 1, k + 1, j + 1, 4 + 6 * j) for k in range(6) for j in range(2)]
    instances = [annotation(n, image_id, label, [polygon(x, 5, 20, 20)], bbox=[x, 5, 20, 20])
                 for n, image_id, label, x in overlapping]  # fmt: skip
    path = write_coco(folder, dataset(instances, images))
    for image in images[:2] + images[3:]:  # smooth pixels, as in photos, not write_coco's noise
        y, x = np.mgrid[: image["height"], : image["width"]]
        pixels = np.stack([64 + 2 * x, 96 + 3 * y, 200 - x - y], -1)
        pixels[10:30, 12:28] = 230
        # Colour at full resolution: decoders differ in how they upsample subsampled colour, not in where pixels go.
        Image.fromarray(pixels.astype(np.uint8)).save(folder / image["file_name"], "JPEG", quality=90, subsampling=0)
    return tuple(
        Cache(build(CocoSource(path), folder / f"{kind}.h5", workers=0, progress=False, pixels=kind))
        for kind in ("raw", "encoded")
    )


def one_line(status, stderr, *words):
    """The command refused its input as bad input should be refused: exit 2, one line naming `words`."""
    return status == 2 and all(word in stderr for word in words) and len(stderr.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def three_classes(tmp_path_factory):
    """(train, valid) caches of three overlapping kinds of figure."""
    folder = tmp_path_factory.mktemp("classes")
    train = build(SyntheticSource(10, seed=1, classes=3), folder / "train.h5", workers=0, progress=False)
    valid = build(SyntheticSource(4, seed=2, classes=3), folder / "valid.h5", workers=0, progress=False)
    return train, valid


@pytest.fixture(scope="session")
def trained(three_classes, tmp_path_factory):
    """A run of the small model on `three_classes`, validated on its valid cache: one epoch."""
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


def run_train(argv, capsys):
    """lean.train run in-process: (exit status, stdout, stderr)."""
    return cli(train_main, argv, capsys)


@pytest.fixture
def serve():
    """serve(bytes, name) -> URL of those bytes, a file of that name, on a loopback HTTP server, stopped after the
    test."""
    servers = []

    def start(payload, name="PennFudanPed.zip"):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/{name}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def foreground_ctrl_c():
    """Let the command take Ctrl-C as in a terminal, even when these tests run as a background job (which ignores
    it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
