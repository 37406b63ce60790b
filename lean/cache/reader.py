"""Read a lean cache: the index in memory, pixels and masks memory-mapped."""

import json
import os

import numpy as np
import torch

from lean import masks as mask_codec
from lean.cache.format import INSTANCE_FIELDS, MAPPED, image_checksum, mapped_offset, open_checked
from lean.errors import LeanError
from lean.images import read_rgb


class Cache:
    """Images and targets of a built cache.

    `classes[label - 1]` names a label and `category_ids[label - 1]` is its id in the source; `names[i]`
    and `source_ids[i]` are image i's in the source. `image(i)` of a cache of raw pixels is a read-only
    view into the memory-mapped file: nothing is decoded and nothing is copied until the caller copies;
    of a cache of encoded pixels, the file's bytes decoded. Safe to share with worker processes: the
    memory maps are reopened lazily in each process.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._stamp = _stamp(self.path)
        with open_checked(self.path) as handle:
            attrs = handle.attrs
            self.fingerprint = str(attrs["fingerprint"])
            self.params = _json_attribute(attrs, "params", dict, self.path)
            self.classes = tuple(_json_attribute(attrs, "classes", list, self.path))
            self.category_ids = tuple(_json_attribute(attrs, "category_ids", list, self.path))
            self.skipped = _json_attribute(attrs, "skipped", dict, self.path)
            self.stored = str(attrs["pixels"])  # "raw" or "encoded"
            self.box_end = str(attrs["box_end"])
            self.has_masks = bool(attrs.get("has_masks", True))  # False: boxes alone, a detection dataset
            self.names = [name.decode() if isinstance(name, bytes) else name for name in handle["names"][:]]
            self.source_ids = handle["source_ids"][:]
            self.sizes = handle["sizes"][:]
            self.pixel_offsets = handle["pixel_offsets"][:]
            self.instance_offsets = handle["instance_offsets"][:]
            self.instances = {field: handle[field][:] for field in INSTANCE_FIELDS}
            self.mask_crops = handle["mask_crops"][:]
            self.mask_offsets = handle["mask_offsets"][:]
            self.checksums = handle["checksums"][:]
            self._offsets = {name: mapped_offset(handle, name) for name in MAPPED}
            self._lengths = {name: handle[name].size for name in MAPPED}
        damage = structure_damage(self)
        if damage:
            raise LeanError(f"{self.path}: damaged cache ({damage}); rebuild it")
        self._maps = self._tensors = None
        self._pid = None

    def __len__(self):
        return len(self.names)

    def check_unchanged(self):
        """One line where the file was rewritten or replaced since it was opened: pages of a file rewritten in
        place under its memory map would kill the process with SIGBUS and no word."""
        if _stamp(self.path) != self._stamp:
            raise LeanError(f"{self.path}: the cache changed on disk while in use (rebuilt or copied over?); "
                            "build a new one under another name, or start again")  # fmt: skip

    def checksum(self, i):
        """sha256 of what the cache holds for image i now, to compare with checksums[i]."""
        _, bits, _ = self.mask_parts(i)
        if self.stored == "encoded":
            pixels = self.encoded(i)
        else:
            pixels = self._mapped()["pixels"][3 * self.pixel_offsets[i] : 3 * self.pixel_offsets[i + 1]]
        return image_checksum(pixels, bits, self.instance_targets(i))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = state["_tensors"] = state["_pid"] = None  # a memory map is per process; never pickle it
        return state

    def _mapped(self):
        if self._pid != os.getpid():
            self._maps = {name: self._memmap(name) for name in MAPPED}
            self._tensors = tuple(torch.from_numpy(self._maps[name]) for name in ("pixels", "mask_bits"))
            self._pid = os.getpid()
        return self._maps

    def _memmap(self, name):
        length = self._lengths[name]
        if length == 0:
            return np.zeros(0, dtype=np.uint8)
        # Copy-on-write, so torch can wrap it without complaint; nothing is ever written back to the file.
        # A plain ndarray over the map: every slice of an np.memmap runs Python code, thousands an epoch.
        mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._offsets[name], shape=(length,))
        return mapped.view(np.ndarray)

    def tensors(self):
        """(pixels, mask bits) of the whole cache as flat uint8 tensors over the memory map, no copy."""
        self._mapped()
        return self._tensors

    @staticmethod
    def _read_only(view):
        view.flags.writeable = False
        return view

    def _index(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for a cache of {len(self)}")
        return i % len(self)

    def encoded(self, i):
        """The image file's bytes of image i (a read-only view), in a cache of encoded pixels."""
        i = self._index(i)
        if self.stored != "encoded":
            raise ValueError(f"{self.path} holds decoded pixels, not files")
        return self._read_only(self._mapped()["pixels"][self.pixel_offsets[i] : self.pixel_offsets[i + 1]])

    def image(self, i):
        """H x W x 3 uint8 RGB pixels of image i (read-only)."""
        i = self._index(i)
        if self.stored == "encoded":
            return self._read_only(read_rgb(self.encoded(i), self.names[i]))
        height, width = self.sizes[i]
        span = slice(3 * self.pixel_offsets[i], 3 * self.pixel_offsets[i + 1])
        return self._read_only(self._mapped()["pixels"][span].reshape(height, width, 3))

    def _instance_span(self, i):
        return slice(self.instance_offsets[i], self.instance_offsets[i + 1])

    def instance_targets(self, i):
        """boxes, area, labels, iscrowd of image i as numpy arrays."""
        span = self._instance_span(self._index(i))
        return {field: values[span] for field, values in self.instances.items()}

    def mask_parts(self, i):
        """(crops (N, 4), bits, offsets (N+1,) into bits) of image i's masks: what lean.masks.decode takes."""
        span = self._instance_span(self._index(i))
        offsets = self.mask_offsets[span.start : span.stop + 1]
        bits = self._mapped()["mask_bits"][offsets[0] : offsets[-1]]
        return self.mask_crops[span], bits, offsets - offsets[0]

    def masks(self, i):
        """N x H x W uint8 masks of image i, one per instance, in target order; they may overlap."""
        height, width = self.sizes[self._index(i)]
        return mask_codec.decode(*self.mask_parts(i), int(height), int(width))

    def target(self, i):
        """The tutorial's target dict for image i, as torch tensors."""
        i = self._index(i)
        target = {field: torch.from_numpy(np.array(values)) for field, values in self.instance_targets(i).items()}
        target["masks"] = torch.from_numpy(self.masks(i))
        target["image_id"] = torch.tensor([i], dtype=torch.int64)
        return target


def structure_damage(cache):
    """What is wrong with a cache's index (offsets out of order or out of bounds, sizes that disagree with
    them, masks outside their image, labels outside the classes), or None: checked whenever a cache opens,
    so that flipped bytes fail in one line, not in a reshape or, worse, in training on garbage."""
    n, m = len(cache.names), len(cache.instances["labels"])
    sizes, pixels, instances, masks = cache.sizes, cache.pixel_offsets, cache.instance_offsets, cache.mask_offsets
    pixel_length = cache._lengths["pixels"] // (3 if cache.stored == "raw" else 1)
    checks = [
        (len(sizes) == len(cache.source_ids) == len(cache.checksums) == n and sizes.shape == (n, 2), "index lengths"),
        ((sizes >= 1).all(), "image sizes"),
        (_offsets_fit(pixels, n, pixel_length), "pixel offsets"),
        (cache.stored == "encoded" or np.array_equal(np.diff(pixels), sizes[:, 0] * sizes[:, 1]), "pixel offsets"),
        (_offsets_fit(instances, n, m), "instance offsets"),
        (
            all(len(values) == m for values in cache.instances.values()) and cache.mask_crops.shape == (m, 4),
            "instances",
        ),
        (_offsets_fit(masks, m, cache._lengths["mask_bits"]), "mask offsets"),
        (((cache.instances["labels"] >= 1) & (cache.instances["labels"] <= len(cache.classes))).all(), "labels"),
        (np.isin(cache.instances["iscrowd"], (0, 1)).all(), "iscrowd"),
        (
            all(isinstance(name, str) for name in cache.classes)
            and len(cache.category_ids) == len(cache.classes)
            and all(isinstance(i, int) for i in cache.category_ids),
            "classes",
        ),
        (all(isinstance(count, int) for count in cache.skipped.values()), "skipped counts"),
        (cache.box_end in ("inclusive", "exclusive"), "box end"),
    ]
    for fine, what in checks:
        if not fine:
            return what
    image_of = np.repeat(np.arange(n), np.diff(instances))
    y0, x0, h, w = cache.mask_crops.T
    inside = (
        (y0 >= 0) & (x0 >= 0) & (y0 + h <= sizes[image_of, 0]) & (x0 + w <= sizes[image_of, 1]) & (h >= 0) & (w >= 0)
    )
    if not inside.all() or not np.array_equal(np.diff(masks), -(-(h * w) // 8)):
        return "mask crops"
    return None


def _stamp(path):
    """What tells one version of a file from another: its inode, size and modification time."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def _json_attribute(attrs, name, kind, path):
    """The JSON attribute `name`, a `kind`; one line naming the cache where it is missing or not one."""
    try:
        value = json.loads(attrs[name])
    except (KeyError, TypeError, ValueError):  # json's decoding error is a ValueError
        value = None
    if not isinstance(value, kind):
        raise LeanError(f"{path}: damaged cache (attribute {name}); rebuild it")
    return value


def _offsets_fit(offsets, count, length):
    return len(offsets) == count + 1 and offsets[0] == 0 and (np.diff(offsets) >= 0).all() and offsets[-1] == length
