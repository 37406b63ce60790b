"""Batches from the cache, on the device: on CUDA made ahead in a background thread, on the CPU when asked for.

The flow per batch, on CUDA:

    cache (memory-mapped)  --thread: pack-->  pinned host slot  --side stream, non_blocking-->
    device bytes  --assemble, on the device-->  images, masks, boxes: what MaskRCNN.forward takes

A cache of encoded pixels has its JPEGs decoded on the device instead, a batch
at a time, by nvJPEG (torchvision's decode_jpeg), in the thread and on a stream
of its own; other files are decoded on the CPU and copied with the rest.

On the CPU, where there is no copy to make, each batch is assembled in the
caller's thread, straight from zero-copy tensors over the memory map: handing
batches over from a thread cost more than it overlapped (docs/performance.md).

Which images form which batch, and which are flipped, are pure functions of
(seed, epoch), computed from `cache.sizes` alone. So the batches are the same
on every run, on CPU and CUDA, however far ahead the thread has read, and an
epoch can be resumed at any batch.
"""

import queue
import threading
import time

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from lean import masks as mask_codec
from lean.errors import LeanError
from lean.images import decode_rgb
from lean.targets import flip_boxes, is_degenerate

# Aspect-ratio bin edges on H / W, as torchvision's references make them (2 ** linspace(-1, 1, 7)).
ASPECT_EDGES = 2.0 ** np.linspace(-1, 1, 7)
PREFETCH = 2  # batches gathered ahead of the one the device is working on
ALIGN = 8  # byte alignment of each array packed into a slot, so it can be viewed as int64
TUTORIAL_TEST_SIZE = 50


def split_indices(count, seed=0, test_size=None):
    """(train, test) cache indices: a seeded permutation, its last `test_size` for testing.

    The tutorial's split: 50 test images (120 train on Penn-Fudan). A dataset
    too small for that keeps a fifth for testing, at least one image.
    """
    if test_size is None:
        test_size = TUTORIAL_TEST_SIZE if count >= 2 * TUTORIAL_TEST_SIZE else max(1, count // 5)
    if not 0 < test_size < count:
        raise ValueError(f"test size {test_size} leaves no image to train or test on out of {count}")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:-test_size]), np.sort(order[-test_size:])


def aspect_groups(sizes):
    """Aspect-ratio bin of every image, from its (H, W)."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    return np.digitize(sizes[:, 0] / sizes[:, 1], ASPECT_EDGES)


def epoch_batches(groups, indices, batch_size, seed, epoch, rank=0, world_size=1, drop_last=False):
    """The batches (lists of cache indices) rank `rank` sees in `epoch`.

    A fresh permutation per (seed, epoch), shared by all ranks, is split into
    world_size interleaved shards of equal length: with drop_last the tail
    that does not divide evenly is left out, else the permutation wraps
    around to fill the last places (as DistributedSampler does). Within a
    shard, batches are filled one aspect-ratio group at a time; what is left
    in the groups at the end is batched together, so every batch but the last
    is full and every rank has the same number of batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(indices))
    if world_size > 1:
        if drop_last:
            order = order[: len(order) // world_size * world_size]
        else:
            order = np.resize(order, -(-len(order) // world_size) * world_size)  # wraps around
        order = order[rank::world_size]
    batches, pending = [], {}
    for index in order.tolist():
        group = pending.setdefault(groups[index], [])
        group.append(index)
        if len(group) == batch_size:
            batches.append(group)
            pending[groups[index]] = []
    leftovers = [index for group in pending.values() for index in group]
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def flip_decisions(seed, epoch, count):
    """Whether each cache index is flipped in `epoch`: p = 0.5, independent of batching."""
    return np.random.default_rng([seed, epoch, 1]).random(count) < 0.5


class _Slot:
    """One reusable host buffer (pinned, for CUDA) a batch is packed into for the copy to the device."""

    def __init__(self, capacity, pinned=True):
        self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)
        self.copied = None  # CUDA event: the device copy of this slot's last batch has finished reading it
        self.layout = None


# What a batch carries per image besides its pixels, as device tensors; "bits" are the kept instances' masks.
_FIELDS = {
    "image_id": torch.int64,
    "boxes": torch.float32,
    "area": torch.float32,
    "labels": torch.int64,
    "iscrowd": torch.int64,
    "bits": torch.uint8,
}
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # np.packbits puts the first pixel in the high bit


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


def _mask_bits(cache, index, kept):
    """(crops (n, 4), bits, offsets (n+1,) into bits) of image `index`'s masks `kept`: Cache.mask_parts (a view of
    the memory map) where none is left out, else the kept ones joined."""
    crops, bits, offsets = cache.mask_parts(index)
    if len(kept) == len(crops):
        return crops, bits, offsets
    starts, ends = offsets[kept], offsets[kept + 1]
    joined = np.concatenate([bits[start:end] for start, end in zip(starts, ends)] or [np.zeros(0, np.uint8)])
    return crops[kept], joined, np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)


def _pixels(cache, index):
    """H x W x 3 uint8 tensor of image `index`: a zero-copy view of a raw cache's memory map, or decoded."""
    if cache.stored == "encoded":
        return torch.from_numpy(cache.image(index).copy())
    height, width = (int(side) for side in cache.sizes[index])
    pixels, _ = cache.tensors()
    return pixels[3 * int(cache.pixel_offsets[index]) : 3 * int(cache.pixel_offsets[index + 1])].view(height, width, 3)


def _is_jpeg(data):
    return len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF  # start-of-image marker


def _device_decodable(cache, batch):
    """The images of `batch` that nvJPEG decodes: JPEGs, in a cache of encoded pixels."""
    if cache.stored != "encoded":
        return []
    return [index for index in batch if _is_jpeg(cache.encoded(index)[:3])]


def _decode_on_device(cache, indices, device, stream):
    """{index: 3 x H x W uint8 image on `device`} of the JPEGs `indices`, decoded on `stream`, and the event
    that marks them done. The stream is the decoder's caller only: torchvision allocates the outputs on the
    current stream, and one reused by the train step could hand nvJPEG memory the step still reads."""
    files, _ = cache.tensors()
    encoded = [files[int(cache.pixel_offsets[i]) : int(cache.pixel_offsets[i + 1])] for i in indices]
    with torch.cuda.stream(stream):
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file nvJPEG cannot read fails the batch: libjpeg-turbo reads more kinds
            images = [decode_rgb(data, cache.names[i]).to(device) for i, data in zip(indices, encoded)]
        done = torch.cuda.Event()
        done.record(stream)
    decoded = dict(zip(indices, images))
    _check_decoded_sizes(cache, decoded)
    return decoded, done


def _check_decoded_sizes(cache, decoded):
    """One line naming the cache and the image where an image of `decoded` ({index: 3 x H x W}) is not the size
    the cache records: the layout of the batch rests on it."""
    for index, image in decoded.items():
        cached = tuple(int(side) for side in cache.sizes[index])
        if tuple(image.shape[1:]) != cached:
            raise LeanError(f"{cache.path}: image {cache.names[index]} decodes to {tuple(image.shape[1:])}, not the "
                            f"cached size {cached}; rebuild the cache")  # fmt: skip


def _mapped_parts(cache, batch, instances, flips):
    """Per image: pixels as a tensor over the memory-mapped cache (or decoded), its masks, in the orientation
    `flips` gives, and its instance arrays, copied, so what the caller gets is its own."""
    parts = []
    for index, arrays in zip(batch, instances):
        height, width = (int(side) for side in cache.sizes[index])
        crops, bits, offsets = _mask_bits(cache, index, arrays["masks"])
        masks = mask_codec.decode(crops, bits, offsets, height, width, flip=bool(flips[index]))
        fields = {name: torch.from_numpy(arrays[name].copy()) for name in _FIELDS if name != "bits"}
        parts.append({"index": index, "pixels": _pixels(cache, index), "masks": torch.from_numpy(masks), **fields})
    return parts


def _pack(cache, batch, instances, slot, decoded_elsewhere=()):
    """Copy a batch's pixels (but those of the images `decoded_elsewhere`), mask bits and instance arrays into
    `slot`, each 8-byte aligned; returns the bytes used. `slot.layout` records, per image, its index, size,
    mask crops and bit offsets, and each part's byte span."""
    host = slot.buffer.numpy()
    cursor = 0
    layout = []
    for index, instance_arrays in zip(batch, instances):
        crops, bits, offsets = _mask_bits(cache, index, instance_arrays["masks"])
        arrays = {} if index in decoded_elsewhere else {"pixels": _pixels(cache, index).numpy()}
        arrays["bits"] = bits
        arrays |= {name: instance_arrays[name] for name in _FIELDS if name != "bits"}
        spans = {}
        for name, array in arrays.items():
            data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            host[cursor : cursor + data.size] = data
            spans[name] = cursor, cursor + data.size
            cursor = -(-(cursor + data.size) // ALIGN) * ALIGN
        size = tuple(int(side) for side in cache.sizes[index])
        layout.append({"index": index, "size": size, "crops": crops.tolist(), "offsets": offsets.tolist(), **spans})
    slot.layout = layout
    return cursor


def _unpacked_parts(data, layout, flips, decoded=None):
    """The parts _pack laid out, as views of `data` (the slot's bytes, on whichever device they now are), the
    masks made there; pixels from `decoded` ({index: 3 x H x W image}) where _pack left them out."""
    parts = []
    for item in layout:
        height, width = item["size"]
        part = {name: data[slice(*item[name])].view(dtype) for name, dtype in _FIELDS.items()}
        part["index"] = item["index"]
        if "pixels" in item:
            part["pixels"] = data[slice(*item["pixels"])].view(height, width, 3)
        else:
            part["pixels"] = decoded[item["index"]].permute(1, 2, 0)
        flipped = bool(flips[item["index"]])
        part["masks"] = paste_masks(part.pop("bits"), item["crops"], item["offsets"], height, width, flipped)
        parts.append(part)
    return parts


def paste_masks(bits, crops, offsets, height, width, flipped=False):
    """lean.masks.decode in torch, on the bits' device: N x H x W uint8 masks from packed crops. `crops` and
    `offsets` are host lists, so nothing here waits for the device."""
    masks = torch.zeros((len(crops), height, width), dtype=torch.uint8, device=bits.device)
    if not len(crops):
        return masks
    unpacked = ((bits.unsqueeze(1) >> _BIT_SHIFTS.to(bits.device)) & 1).view(-1)
    for n, (y, x, h, w) in enumerate(crops):
        if h == 0:
            continue
        crop = unpacked[8 * offsets[n] : 8 * offsets[n] + h * w].view(h, w)
        if flipped:
            crop, x = crop.flip(1), width - x - w
        masks[n, y : y + h, x : x + w] = crop
    return masks


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
        target["masks"] = part["masks"]
        images.append(image)
        targets.append(target)
    return images, targets


class Loader:
    """Iterate one epoch of (images, targets) batches on `device`; see the module docstring.

    `set_epoch(e, start_batch=k)` picks the epoch's order (and resumes at
    batch k of it); `len(loader)` is the epoch's full number of batches.
    With train=True, images are flipped left-right with p = 0.5 and
    instances with zero-width or zero-height boxes, which Mask R-CNN's
    training refuses, are left out of the targets. `device_decode=False`
    decodes a CUDA loader's JPEGs on the CPU instead of with nvJPEG.
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
    ):
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.device = torch.device(device)
        self.device_decode = device_decode and self.device.type == "cuda" and cache.stored == "encoded"
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.train, self.rank, self.world_size, self.drop_last = train, rank, world_size, drop_last
        self.dtype = dtype
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
            return epoch_batches(
                self.groups,
                self.indices,
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
        if not self.train:
            return np.zeros(len(self.cache), dtype=bool)
        return flip_decisions(self.seed, self.epoch, len(self.cache))

    def _batch_instances(self, batch, flips):
        return [self._instances.parts(index, flips[index]) for index in batch]

    def _slot_capacity(self):
        """Bytes of the largest batch: pixels, mask bits, instance arrays (image_id, boxes, area, labels,
        iscrowd), each part rounded up to ALIGN."""
        cache = self.cache
        pixels = np.sort(cache.sizes[:, 0] * cache.sizes[:, 1])[-self.batch_size :]
        instances = np.diff(cache.instance_offsets)
        bits = np.diff(cache.mask_offsets[cache.instance_offsets])
        per_instance = 16 + 4 + 8 + 8
        per_image = len(_FIELDS) * ALIGN + 8 + int(instances.max(initial=0)) * per_instance + int(bits.max(initial=0))
        return int(pixels.sum()) * 3 + self.batch_size * (per_image + ALIGN)

    def __iter__(self):
        batches = self.batches()[self.start_batch :]
        flips = self.flips()
        if self.device.type != "cuda":
            for batch in batches:
                start = time.perf_counter()
                parts = _mapped_parts(self.cache, batch, self._batch_instances(batch, flips), flips)
                images, targets = assemble(parts, flips, self.dtype)
                self.wait_seconds += time.perf_counter() - start
                yield images, targets
            return

        free = queue.Queue()
        for _ in range(PREFETCH + 2):  # being packed, ready (PREFETCH), being copied
            free.put(_Slot(self._slot_capacity()))
        decode_stream = torch.cuda.Stream(self.device) if self.device_decode else None

        def pack(batch):
            slot = free.get()
            if slot is None:
                raise _Stopped
            if slot.copied is not None:
                slot.copied.synchronize()  # the device copy may still be reading this buffer
            jpegs = _device_decodable(self.cache, batch) if self.device_decode else []
            decoded = _decode_on_device(self.cache, jpegs, self.device, decode_stream) if jpegs else ({}, None)
            return slot, _pack(self.cache, batch, self._batch_instances(batch, flips), slot, jpegs), decoded

        ahead = _Ahead(pack, batches, on_stop=lambda: free.put(None))
        try:
            yield from self._copied_to_device(ahead, free, flips)
        finally:
            self.wait_seconds += ahead.wait_seconds
            ahead.stop()
            while not free.empty():  # the pinned buffers go back now, not at some later collection
                free.get()

    def _copied_to_device(self, packed, free, flips):
        """Copy batch k+1 on a side stream while the caller works on batch k."""
        copy_stream = torch.cuda.Stream(self.device)
        compute_stream = torch.cuda.current_stream(self.device)

        def start_copy(ready):
            if ready is None:
                return None
            slot, used, decoded = ready
            with torch.cuda.stream(copy_stream):
                data = slot.buffer[:used].to(self.device, non_blocking=True)
                slot.copied = torch.cuda.Event()
                slot.copied.record(copy_stream)
            return slot, slot.layout, data, decoded

        ready = iter(packed)
        in_flight = start_copy(next(ready, None))
        while in_flight is not None:
            slot, layout, data, (decoded, decoded_done) = in_flight
            compute_stream.wait_event(slot.copied)
            data.record_stream(compute_stream)  # the allocator must not reuse it before compute is done
            if decoded_done is not None:
                compute_stream.wait_event(decoded_done)
                for image in decoded.values():
                    image.record_stream(compute_stream)
            in_flight = start_copy(next(ready, None))
            free.put(slot)  # pack() waits on slot.copied before refilling it
            yield assemble(_unpacked_parts(data, layout, flips, decoded), flips, self.dtype)


class _Stopped(Exception):
    pass


class _Ahead:
    """Runs make(batch) for each batch in a background thread, keeping PREFETCH results ready, in order."""

    def __init__(self, make, batches, on_stop=None):
        self.make, self.batches, self.on_stop = make, batches, on_stop
        self.ready = queue.Queue(maxsize=PREFETCH)
        self.stopping = threading.Event()
        self.wait_seconds = 0.0  # how long the consumer waited for a batch
        self.thread = threading.Thread(target=self._run, name="lean-loader", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for batch in self.batches:
                item = self.make(batch)
                while not self.stopping.is_set():
                    try:
                        self.ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopping.is_set():
                    return
        except _Stopped:
            return
        except BaseException as error:  # handed to the consumer, raised there
            self.ready.put(error)

    def __iter__(self):
        for _ in self.batches:
            start = time.perf_counter()
            item = self.ready.get()
            self.wait_seconds += time.perf_counter() - start
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self):
        self.stopping.set()
        if self.on_stop:
            self.on_stop()  # wakes a thread waiting for a free slot
        while self.thread.is_alive():  # make room, so a thread blocked on a full queue sees the stop
            try:
                self.ready.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)
