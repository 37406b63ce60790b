"""The Penn-Fudan source: a folder of PNG images (PNGImages/) and instance-id masks (PedMasks/), paired by name,
one class (person); the tutorial's dataset, downloaded when it is not at hand. A lean.sources.Source.
"""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lean.download import BUILD_ADVICE, fetch_pennfudan
from lean.errors import LeanError, reason
from lean.example import from_instance_map
from lean.images import read_header, read_rgb

IMAGE_DIR = "PNGImages"
MASK_DIR = "PedMasks"
MASK_SUFFIX = "_mask"
# Integer modes PIL decodes single-channel PNGs into; anything else is not an id map.
MASK_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")


def find_pairs(root):
    """(name, image path, mask path) for every example under `root`, paired by name."""
    root = Path(root)
    if not root.is_dir():
        raise LeanError(f"{root}: no such folder")
    images = _pngs(root / IMAGE_DIR, root)
    masks = _pngs(root / MASK_DIR, root)
    mask_names = {}
    for name, path in masks.items():
        if not name.endswith(MASK_SUFFIX):
            raise LeanError(f"{path}: mask name does not end in {MASK_SUFFIX}.png")
        mask_names[name[: -len(MASK_SUFFIX)]] = path
    for name, path in sorted(images.items()):
        if name not in mask_names:
            raise LeanError(f"{path}: image has no mask (expected {root / MASK_DIR / (name + MASK_SUFFIX + '.png')})")
    for name, path in sorted(mask_names.items()):
        if name not in images:
            raise LeanError(f"{path}: mask has no image (expected {root / IMAGE_DIR / (name + '.png')})")
    if not images:
        raise LeanError(f"{root / IMAGE_DIR}: no PNG images")
    return [(name, images[name], mask_names[name]) for name in sorted(images)]


def _pngs(folder, root):
    if not folder.is_dir():
        raise LeanError(f"{root}: not a PennFudan folder (no {folder.name}/ inside)")
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        raise LeanError(f"{folder}: cannot list folder ({error.strerror or error})") from None
    return {p.stem: p for p in entries if p.suffix.lower() == ".png" and not p.name.startswith(".")}


def png_size(path):
    """(height, width) from the PNG header, without decoding pixels."""
    height, width, kind = read_header(path, "PNG")
    _check_format(kind, path)
    return height, width


def read_png(path, load=True):
    """(the file's bytes, a PIL image of them: its header checked, and its pixels decoded when `load`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise LeanError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        image = Image.open(io.BytesIO(data))
        _check_format(image.format, path)
        if load:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise LeanError(f"{path}: not a readable PNG ({reason(error)})") from None
    return data, image


def _check_format(kind, path):
    if kind != "PNG":
        raise LeanError(f"{path}: not a PNG file (it holds {kind or 'unknown'} data)")


def to_id_map(image, path):
    """The H x W integer instance-id map of a mask image."""
    if image.mode not in MASK_MODES:
        raise LeanError(f"{path}: mask has mode {image.mode}; expected a single-channel instance-id map")
    ids = np.asarray(image)
    return ids.astype(np.uint8) if ids.dtype == bool else ids


class PennFudanSource:
    kind = "pennfudan"
    classes = ("person",)
    category_ids = (1,)
    box_end = "inclusive"  # the tutorial's boxes: x1 is the last column a mask covers
    masks = True

    def __init__(self, root):
        self.root = Path(root)
        self.pairs = find_pairs(self.root)
        self.names = [name for name, _, _ in self.pairs]
        self.skipped = {}  # every instance of an id map is kept

    def __len__(self):
        return len(self.pairs)

    def params(self):
        return {"source": self.kind, "root": str(self.root.resolve())}

    def source_ids(self):
        return list(range(len(self)))

    def sizes(self):
        """(N, 2) int64 (height, width) of every image, read from PNG headers and checked against the masks."""
        sizes = np.zeros((len(self), 2), dtype=np.int64)
        for i, (_, image_path, mask_path) in enumerate(self.pairs):
            sizes[i] = png_size(image_path)
            mask_size = png_size(mask_path)
            if mask_size != tuple(sizes[i]):
                raise LeanError(
                    f"{mask_path}: mask is {_hw(mask_size)} but its image {image_path.name} is {_hw(sizes[i])}"
                )
        return sizes

    def files(self):
        return [path for _, image, mask in self.pairs for path in (image, mask)]

    def encoded_sizes(self):
        """Bytes of every image file, as the cache stores them with --pixels encoded."""
        return np.array([image_path.stat().st_size for _, image_path, _ in self.pairs], dtype=np.int64)

    def load(self, i, encoded=False):
        _, image_path, mask_path = self.pairs[i]
        data, header = read_png(image_path, load=False)  # torchvision decodes its pixels, below
        mask_data, mask = read_png(mask_path)
        id_map = to_id_map(mask, mask_path)
        if id_map.shape != (header.height, header.width):
            raise LeanError(
                f"{mask_path}: mask is {_hw(id_map.shape)} but its image is {_hw((header.height, header.width))}"
            )
        digest = hashlib.sha256(hashlib.sha256(data).digest() + hashlib.sha256(mask_data).digest()).digest()
        pixels = read_rgb(data, image_path, "PNG")  # decoded either way: a file that does not decode is refused now
        if encoded:
            return from_instance_map(id_map, digest, encoded=data)
        return from_instance_map(id_map, digest, pixels=pixels)


def _hw(shape):
    return f"{shape[1]}x{shape[0]}"


def default_root(root=None, download_to="data", advice=BUILD_ADVICE):
    """The PennFudan folder to use: `root`, else $LEAN_PENNFUDAN, else data/PennFudanPed, else a download;
    `advice` says what the calling command offers instead, should the download fail."""
    if root is not None:
        return Path(root)
    if os.environ.get("LEAN_PENNFUDAN"):
        return Path(os.environ["LEAN_PENNFUDAN"])
    local = Path(download_to) / "PennFudanPed"
    if local.is_dir():
        return local
    return fetch_pennfudan(Path(download_to), advice=advice)
