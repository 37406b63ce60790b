"""Batches from the cache, on the device: on CUDA made ahead in a background thread, on the CPU when asked for.

Which images form which batch, and which are flipped, are pure functions of
(seed, epoch) (lean.sampling), so the batches are the same on every run, on
CPU and CUDA, however far ahead the thread has read, and an epoch can be
resumed at any batch. On CUDA each batch's bytes are packed into pinned memory
in a background thread, copied on a side stream and unpacked on the device
(lean.staging); a cache of encoded pixels has its JPEGs decoded there by
nvJPEG. On the CPU, where there is no copy to make, each batch is assembled in
the caller's thread, straight from zero-copy tensors over the memory map:
handing batches over from a thread cost more than it overlapped
(docs/performance.md).
"""

import queue
import time

import numpy as np
import torch

from lean import staging
from lean.sampling import aspect_groups, epoch_batches, flip_decisions, repeated_indices
from lean.targets import flip_boxes, is_degenerate


def _instance_parts(cache, index, train):
    """One image's id and the instances it trains on: numpy arrays, and which of the cache's masks they are.

    Training leaves out degenerate instances, which Mask R-CNN refuses, and crowd regions, as torchvision's
    references do; they stay in the cache for evaluation.
    """
    instances = cache.instance_targets(index)
    keep = np.ones(len(instances["boxes"]), dtype=bool)
    if train:
        keep = ~is_degenerate(instances["boxes"]) & (instances["iscrowd"] == 0)
    return {
        "image_id": np.array([index], dtype=np.int64),
        "masks": np.flatnonzero(keep),  # which of the image's masks
        **{name: instances[name][keep] for name in ("boxes", "area", "labels", "iscrowd")},
    }


class _InstanceTable:
    """Each image's instance arrays in both orientations, worked out the first time the image is drawn:
    a dozen tiny array operations, cheap once, but a large share of the CPU loader's time per image and
    epoch (docs/performance.md)."""

    def __init__(self, cache, train):
        self.cache, self.train, self.known = cache, train, {}
        self.inclusive = cache.box_end == "inclusive"

    def parts(self, index, flipped):
        if index not in self.known:
            upright = _instance_parts(self.cache, index, self.train)
            width = int(self.cache.sizes[index][1])
            mirrored = flip_boxes(upright["boxes"], width if self.inclusive else width + 1)
            self.known[index] = upright, {**upright, "boxes": mirrored}
        return self.known[index][int(flipped)]


def assemble(parts, flips, dtype=torch.float32):
    """Model inputs from a batch's parts: ([3 x H x W image], [target dict]).

    Images are in [0, 1] when `dtype` is floating (what torchvision's
    MaskRCNN takes), or uint8 as stored, for a model that folds the
    conversion into its normalisation (lean's does). Either way they lie
    channels-last in memory (a 3 x H x W view of H x W x 3 pixels): one pass
    over the pixels, no transposing copy. The parts' boxes and masks are the
    flipped image's already where `flips` says so; pixels are flipped here,
    where the batch is. Images and masks are new memory; the small target
    tensors may be views of the parts, which is safe as long as nothing
    reuses the parts' memory (the memory map is never written, and each
    device copy is a fresh allocation).
    """
    images, targets = [], []
    for part in parts:
        pixels = part["pixels"]
        flipped = bool(flips[part["index"]])  # a host int: reading image_id on the device would sync
        if flipped:  # flip uint8 pixels: cheaper than floats
            pixels = pixels.flip(1)
        image = pixels.permute(2, 0, 1)
        if dtype.is_floating_point:
            image = image.to(dtype).mul_(1 / 255)
        elif not flipped:  # flip() copied already; the memory map itself is never handed out
            image = image.clone()
        target = {name: part[name] for name in ("labels", "image_id", "area", "iscrowd")}
        target["boxes"] = part["boxes"].view(-1, 4)
        if "masks" in part:  # a Faster R-CNN's batch has none
            target["masks"] = part["masks"]
        images.append(image)
        targets.append(target)
    return images, targets


class Loader:
    """Iterate one epoch of (images, targets) batches on `device`; see the module docstring.

    `set_epoch(e, start_batch=k)` picks the epoch's order (and resumes at
    batch k of it); `len(loader)` is the epoch's full number of batches.
    With train=True, images are flipped left-right with p = 0.5 (unless flip=False: the validation loss's
    loader) and instances with zero-width or zero-height boxes, which Mask R-CNN's
    training refuses, are left out of the targets. `device_decode=False`
    decodes a CUDA loader's JPEGs on the CPU instead of with nvJPEG; `masks=False` leaves the masks out of
    the targets, and their work out of the batches (a Faster R-CNN trains on boxes alone). With
    `repeat_factors` (one for each of `indices`), a shuffled epoch takes each image as often as
    lean.sampling.repeated_indices says.
    """

    def __init__(
        self,
        cache,
        batch_size=2,
        shuffle=True,
        seed=0,
        device="cuda",
        indices=None,
        train=True,
        rank=0,
        world_size=1,
        drop_last=False,
        dtype=torch.float32,
        device_decode=True,
        masks=True,
        flip=True,
        repeat_factors=None,
    ):
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.flip = flip and train
        self.repeat_factors = repeat_factors  # one for each of `indices`: lean.sampling.repeated_indices
        self.device = torch.device(device)
        self.device_decode = device_decode and self.device.type == "cuda" and cache.stored == "encoded"
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.train, self.rank, self.world_size, self.drop_last = train, rank, world_size, drop_last
        self.dtype, self.masks = dtype, masks
        self.groups = aspect_groups(cache.sizes)
        self.epoch, self.start_batch = 0, 0
        self._batches = None  # (epoch, its batches): len(loader) is asked every step
        self._instances = _InstanceTable(cache, train)
        self.wait_seconds = 0.0  # time the consumer spent waiting for its batches (on the host)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self):
        """This rank's batches of cache indices for the current epoch (worked out once per epoch)."""
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = self.epoch, self._epoch_batches()
        return self._batches[1]

    def _epoch_batches(self):
        if self.shuffle:
            indices = self.indices
            if self.repeat_factors is not None:
                indices = repeated_indices(indices, self.repeat_factors, self.seed, self.epoch)
            return epoch_batches(
                self.groups,
                indices,
                self.batch_size,
                self.seed,
                self.epoch,
                self.rank,
                self.world_size,
                self.drop_last,
            )
        order = self.indices[self.rank :: self.world_size]
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        return batches[:-1] if self.drop_last and batches and len(batches[-1]) < self.batch_size else batches

    def __len__(self):
        return len(self.batches())

    def flips(self):
        if not self.flip:
            return np.zeros(len(self.cache), dtype=bool)
        return flip_decisions(self.seed, self.epoch, len(self.cache))

    def _batch_instances(self, batch, flips):
        return [self._instances.parts(index, flips[index]) for index in batch]

    def __iter__(self):
        batches = self.batches()[self.start_batch :]
        flips = self.flips()
        if self.device.type != "cuda":
            for batch in batches:
                start = time.perf_counter()
                self.cache.check_unchanged()
                parts = staging.mapped_parts(self.cache, batch, self._batch_instances(batch, flips), flips, self.masks)
                images, targets = assemble(parts, flips, self.dtype)
                self.wait_seconds += time.perf_counter() - start
                yield images, targets
            return

        free = queue.Queue()
        for _ in range(staging.PREFETCH + 2):  # being packed, ready (PREFETCH), being copied
            free.put(staging.Slot(staging.slot_capacity(self.cache, self.batch_size)))
        decode_stream = torch.cuda.Stream(self.device) if self.device_decode else None

        def pack_next(batch):
            slot = free.get()
            if slot is None:
                raise staging.Stopped
            if slot.copied is not None:
                slot.copied.synchronize()  # the device copy may still be reading this buffer
            self.cache.check_unchanged()
            jpegs = staging.device_decodable(self.cache, batch) if self.device_decode else []
            decoded = staging.decode_on_device(self.cache, jpegs, self.device, decode_stream) if jpegs else ({}, None)
            used = staging.pack(self.cache, batch, self._batch_instances(batch, flips), slot, jpegs)
            return slot, used, decoded

        ahead = staging.Ahead(pack_next, batches, on_stop=lambda: free.put(None))
        try:
            for parts in staging.copied_to_device(ahead, free, flips, self.device, self.masks):
                yield assemble(parts, flips, self.dtype)
        finally:
            self.wait_seconds += ahead.wait_seconds
            ahead.stop()
            while not free.empty():  # the pinned buffers go back now, not at some later collection
                free.get()
