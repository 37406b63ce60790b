"""Read a lean cache: the index in memory, pixels and masks memory-mapped."""

import json
import os

import numpy as np
import torch

from lean import masks as mask_codec
from lean.cache.format import INSTANCE_FIELDS, MAPPED, mapped_offset, open_checked
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
        with open_checked(self.path) as handle:
            attrs = handle.attrs
            self.fingerprint = str(attrs["fingerprint"])
            self.params = json.loads(attrs["params"])
            self.classes = tuple(json.loads(attrs["classes"]))
            self.category_ids = tuple(json.loads(attrs["category_ids"]))
            self.skipped = json.loads(attrs["skipped"])
            self.stored = str(attrs["pixels"])  # "raw" or "encoded"
            self.box_end = str(attrs["box_end"])
            self.names = [name.decode() if isinstance(name, bytes) else name for name in handle["names"][:]]
            self.source_ids = handle["source_ids"][:]
            self.sizes = handle["sizes"][:]
            self.pixel_offsets = handle["pixel_offsets"][:]
            self.instance_offsets = handle["instance_offsets"][:]
            self.instances = {field: handle[field][:] for field in INSTANCE_FIELDS}
            self.mask_crops = handle["mask_crops"][:]
            self.mask_offsets = handle["mask_offsets"][:]
            self._offsets = {name: mapped_offset(handle, name) for name in MAPPED}
            self._lengths = {name: handle[name].size for name in MAPPED}
        if not (len(self.sizes) == len(self.names) == len(self.source_ids) == len(self.pixel_offsets) - 1
                == len(self.instance_offsets) - 1):  # fmt: skip
            raise LeanError(f"{self.path}: cache index arrays disagree in length; rebuild it")
        self._maps = None
        self._pid = None

    def __len__(self):
        return len(self.names)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = state["_pid"] = None  # a memory map is per process; never pickle its pixels
        return state

    def _mapped(self):
        if self._pid != os.getpid():
            self._maps = {name: self._memmap(name) for name in MAPPED}
            self._pid = os.getpid()
        return self._maps

    def _memmap(self, name):
        length = self._lengths[name]
        if length == 0:
            return np.zeros(0, dtype=np.uint8)
        # Copy-on-write, so torch can wrap it without complaint; nothing is ever written back to the file.
        return np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._offsets[name], shape=(length,))

    def tensors(self):
        """(pixels, mask bits) of the whole cache as flat uint8 tensors over the memory map, no copy."""
        maps = self._mapped()
        return torch.from_numpy(maps["pixels"]), torch.from_numpy(maps["mask_bits"])

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
