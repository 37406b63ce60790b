"""A batch's bytes from the cache to the device: read from the memory map, packed into a pinned host slot,
copied on a side stream, JPEGs decoded by nvJPEG, then unpacked there into the parts a batch is made of.

    cache (memory-mapped)  --thread: pack-->  pinned host slot  --side stream, non_blocking-->
    device bytes  --unpacked, masks pasted on the device-->  parts (lean.loader assembles them)

On the CPU there is no copy to make: `mapped_parts` gives the same parts as
tensors over the memory map itself.
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

PREFETCH = 2  # batches gathered ahead of the one the device is working on
ALIGN = 8  # byte alignment of each array packed into a slot, so it can be viewed as int64


class Slot:
    """One reusable host buffer (pinned, for CUDA) a batch is packed into for the copy to the device."""

    def __init__(self, capacity, pinned=True):
        self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)
        self.copied = None  # CUDA event: the device copy of this slot's last batch has finished reading it
        self.layout = None


# What a batch carries per image besides its pixels, as device tensors; "bits" are the kept instances' masks.
FIELDS = {
    "image_id": torch.int64,
    "boxes": torch.float32,
    "area": torch.float32,
    "labels": torch.int64,
    "iscrowd": torch.int64,
    "bits": torch.uint8,
}


def mask_bits(cache, index, kept):
    """(crops (n, 4), bits, offsets (n+1,) into bits) of image `index`'s masks `kept`: Cache.mask_parts (a view of
    the memory map) where none is left out, else the kept ones joined."""
    crops, bits, offsets = cache.mask_parts(index)
    if len(kept) == len(crops):
        return crops, bits, offsets
    starts, ends = offsets[kept], offsets[kept + 1]
    joined = np.concatenate([bits[start:end] for start, end in zip(starts, ends)] or [np.zeros(0, np.uint8)])
    return crops[kept], joined, np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)


def image_pixels(cache, index):
    """H x W x 3 uint8 tensor of image `index`: a zero-copy view of a raw cache's memory map, or decoded."""
    if cache.stored == "encoded":
        return torch.from_numpy(cache.image(index).copy())
    height, width = (int(side) for side in cache.sizes[index])
    pixels, _ = cache.tensors()
    return pixels[3 * int(cache.pixel_offsets[index]) : 3 * int(cache.pixel_offsets[index + 1])].view(height, width, 3)


def _is_jpeg(data):
    return len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF  # start-of-image marker


def device_decodable(cache, batch):
    """The images of `batch` that nvJPEG decodes: JPEGs, in a cache of encoded pixels."""
    if cache.stored != "encoded":
        return []
    return [index for index in batch if _is_jpeg(cache.encoded(index)[:3])]


def decode_on_device(cache, indices, device, stream):
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
    check_decoded_sizes(cache, decoded)
    return decoded, done


def check_decoded_sizes(cache, decoded):
    """One line naming the cache and the image where an image of `decoded` ({index: 3 x H x W}) is not the size
    the cache records: the layout of the batch rests on it."""
    for index, image in decoded.items():
        cached = tuple(int(side) for side in cache.sizes[index])
        if tuple(image.shape[1:]) != cached:
            raise LeanError(f"{cache.path}: image {cache.names[index]} decodes to {tuple(image.shape[1:])}, not the "
                            f"cached size {cached}; rebuild the cache")  # fmt: skip


def mapped_parts(cache, batch, instances, flips, masks=True):
    """Per image: pixels as a tensor over the memory-mapped cache (or decoded), its masks (unless `masks` is
    False: a Faster R-CNN's batch), in the orientation `flips` gives, and its instance arrays, copied, so what
    the caller gets is its own."""
    parts = []
    for index, arrays in zip(batch, instances):
        fields = {name: torch.from_numpy(arrays[name].copy()) for name in FIELDS if name != "bits"}
        part = {"index": index, "pixels": image_pixels(cache, index), **fields}
        if masks:
            height, width = (int(side) for side in cache.sizes[index])
            crops, bits, offsets = mask_bits(cache, index, arrays["masks"])
            decoded = mask_codec.decode(crops, bits, offsets, height, width, flip=bool(flips[index]))
            part["masks"] = torch.from_numpy(decoded)
        parts.append(part)
    return parts


def pack(cache, batch, instances, slot, decoded_elsewhere=()):
    """Copy a batch's pixels (but those of the images `decoded_elsewhere`), mask bits and instance arrays into
    `slot`, each 8-byte aligned; returns the bytes used. `slot.layout` records, per image, its index, size,
    mask crops and bit offsets, and each part's byte span."""
    host = slot.buffer.numpy()
    cursor = 0
    layout = []
    for index, instance_arrays in zip(batch, instances):
        crops, bits, offsets = mask_bits(cache, index, instance_arrays["masks"])
        arrays = {} if index in decoded_elsewhere else {"pixels": image_pixels(cache, index).numpy()}
        arrays["bits"] = bits
        arrays |= {name: instance_arrays[name] for name in FIELDS if name != "bits"}
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


def unpacked_parts(data, layout, flips, decoded=None, masks=True):
    """The parts pack laid out, as views of `data` (the slot's bytes, on whichever device they now are), the
    masks made there unless `masks` is False; pixels from `decoded` ({index: 3 x H x W image}) where pack left
    them out."""
    parts = []
    for item in layout:
        height, width = item["size"]
        part = {name: data[slice(*item[name])].view(dtype) for name, dtype in FIELDS.items()}
        part["index"] = item["index"]
        if "pixels" in item:
            part["pixels"] = data[slice(*item["pixels"])].view(height, width, 3)
        else:
            part["pixels"] = decoded[item["index"]].permute(1, 2, 0)
        bits = part.pop("bits")
        if masks:
            flipped = bool(flips[item["index"]])
            part["masks"] = paste_masks(bits, item["crops"], item["offsets"], height, width, flipped)
        parts.append(part)
    return parts


def paste_masks(bits, crops, offsets, height, width, flipped=False):
    """lean.masks.decode in torch, on the bits' device: N x H x W uint8 masks from packed crops. `crops` and
    `offsets` are host lists, so nothing here waits for the device."""
    masks = torch.zeros((len(crops), height, width), dtype=torch.uint8, device=bits.device)
    if not len(crops):
        return masks
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)  # np.packbits: first pixel, high bit
    unpacked = ((bits.unsqueeze(1) >> shifts) & 1).view(-1)
    for n, (y, x, h, w) in enumerate(crops):
        if h == 0:
            continue
        crop = unpacked[8 * offsets[n] : 8 * offsets[n] + h * w].view(h, w)
        if flipped:
            crop, x = crop.flip(1), width - x - w
        masks[n, y : y + h, x : x + w] = crop
    return masks


def slot_capacity(cache, batch_size):
    """Bytes of the largest batch of `cache`: pixels, mask bits and instance arrays (image_id, boxes, area, labels,
    iscrowd), each part rounded up to ALIGN."""
    pixels = np.sort(cache.sizes[:, 0] * cache.sizes[:, 1])[-batch_size:]
    instances = np.diff(cache.instance_offsets)
    bits = np.diff(cache.mask_offsets[cache.instance_offsets])
    per_instance = 16 + 4 + 8 + 8
    per_image = len(FIELDS) * ALIGN + 8 + int(instances.max(initial=0)) * per_instance + int(bits.max(initial=0))
    return int(pixels.sum()) * 3 + batch_size * (per_image + ALIGN)


def copied_to_device(packed, free, flips, device, masks=True):
    """The parts of each packed batch, on `device`: batch k+1 is copied on a side stream while the caller works on
    batch k. `packed` yields (slot, bytes used, (decoded images, their event)); each slot goes back to `free`
    once its copy is queued (the packer waits on slot.copied before refilling it)."""
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)

    def start_copy(ready):
        if ready is None:
            return None
        slot, used, decoded = ready
        with torch.cuda.stream(copy_stream):
            data = slot.buffer[:used].to(device, non_blocking=True)
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
        free.put(slot)
        yield unpacked_parts(data, layout, flips, decoded, masks)


class Stopped(Exception):
    pass


class Ahead:
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
        except Stopped:
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
