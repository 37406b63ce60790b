"""Read a lean cache: small arrays in memory, pixels and instance maps memory-mapped."""

import json
import os

import numpy as np
import torch

from lean.cache.format import INSTANCE_FIELDS, mapped_offset, open_checked
from lean.errors import LeanError
from lean.targets import masks_of


class Cache:
    """Images and targets of a built cache.

    `image(i)` and `instance_map(i)` return read-only views into the
    memory-mapped file: nothing is decoded and nothing is copied until the
    caller copies. Every per-instance array and the sizes are read once, at
    construction. Safe to share with worker processes: the memory maps are
    reopened lazily in each process.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with open_checked(self.path) as handle:
            self.fingerprint = str(handle.attrs["fingerprint"])
            self.params = json.loads(handle.attrs["params"])
            self.names = [name.decode() if isinstance(name, bytes) else name for name in handle["names"][:]]
            self.sizes = handle["sizes"][:]
            self.pixel_offsets = handle["pixel_offsets"][:]
            self.instance_offsets = handle["instance_offsets"][:]
            self.instances = {field: handle[field][:] for field in INSTANCE_FIELDS}
            self._offsets = {name: mapped_offset(handle, name) for name in ("pixels", "instance_maps")}
        if not (len(self.sizes) == len(self.names) == len(self.pixel_offsets) - 1 == len(self.instance_offsets) - 1):
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
            total = int(self.pixel_offsets[-1])
            self._maps = {
                "pixels": self._memmap("pixels", (total, 3)),
                "instance_maps": self._memmap("instance_maps", (total,)),
            }
            self._pid = os.getpid()
        return self._maps

    def _memmap(self, name, shape):
        if shape[0] == 0:
            return np.zeros(shape, dtype=np.uint8)
        # Copy-on-write, so torch can wrap it without complaint; nothing is ever written back to the file.
        return np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._offsets[name], shape=shape)

    def tensors(self):
        """(pixels (P, 3), instance maps (P,)) of the whole cache as uint8 tensors over the memory map, no copy."""
        maps = self._mapped()
        return torch.from_numpy(maps["pixels"]), torch.from_numpy(maps["instance_maps"])

    @staticmethod
    def _read_only(view):
        view.flags.writeable = False
        return view

    def _span(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for a cache of {len(self)}")
        i = i % len(self)
        return i, slice(self.pixel_offsets[i], self.pixel_offsets[i + 1])

    def image(self, i):
        """H x W x 3 uint8 RGB pixels of image i (a read-only view)."""
        i, span = self._span(i)
        height, width = self.sizes[i]
        return self._read_only(self._mapped()["pixels"][span].reshape(height, width, 3))

    def instance_map(self, i):
        """H x W uint8 map of image i: 0 background, instances 1..n in target order (a read-only view)."""
        i, span = self._span(i)
        height, width = self.sizes[i]
        return self._read_only(self._mapped()["instance_maps"][span].reshape(height, width))

    def instance_targets(self, i):
        """boxes, area, labels, iscrowd of image i as numpy arrays."""
        i, _ = self._span(i)
        span = slice(self.instance_offsets[i], self.instance_offsets[i + 1])
        return {field: values[span] for field, values in self.instances.items()}

    def masks(self, i):
        """N x H x W uint8 masks of image i, one per instance, in target order."""
        i, _ = self._span(i)
        count = int(self.instance_offsets[i + 1] - self.instance_offsets[i])
        return masks_of(self.instance_map(i), np.arange(1, count + 1))

    def target(self, i):
        """The tutorial's target dict for image i, as torch tensors."""
        i, _ = self._span(i)
        target = {field: torch.from_numpy(np.array(values)) for field, values in self.instance_targets(i).items()}
        target["masks"] = torch.from_numpy(self.masks(i))
        target["image_id"] = torch.tensor([i], dtype=torch.int64)
        return target
