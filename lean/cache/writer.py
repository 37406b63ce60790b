"""Build a cache from a source: workers decode straight into the file, which is renamed into place when whole.

The pixels dataset is allocated first, at a fixed offset in a temporary file,
laid out from the source's sizes (decoded pixels) or file sizes (encoded
bytes); each worker process writes the pixels of the examples it loads
straight to their place in it, so no image crosses a pipe. The parent
collects the per-instance arrays and bit-packed masks, writes them with the
index, and renames the finished file over the destination.
"""

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import h5py
import numpy as np

from lean.cache.format import FORMAT, INSTANCE_FIELDS, VERSION, image_checksum, is_cache
from lean.errors import LeanError
from lean.files import check_output
from lean.progress import Progress

PIXELS = ("raw", "encoded")
RAW_LIMIT = 2 << 30  # decoded pixels up to this many bytes are stored raw by default, more are stored encoded


def default_pixels(sizes):
    """raw while the decoded dataset stays under RAW_LIMIT: fastest to read; encoded above, where raw pixels
    would outgrow the disk (10,000 12-megapixel photos: 360 GB raw)."""
    return "raw" if int((sizes[:, 0] * sizes[:, 1]).sum()) * 3 < RAW_LIMIT else "encoded"


class _Job:
    """One build's shared state: the source, the layout, and the temporary file to write pixels into."""

    def __init__(self, source, path, sizes, offsets, pixels_offset, encoded):
        self.source, self.sizes, self.offsets = source, sizes, offsets
        self.path, self.pixels_offset, self.encoded = path, pixels_offset, encoded
        self.fd = None

    def open(self):
        self.fd = os.open(self.path, os.O_WRONLY)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def store(self, i):
        """Load example i, write its pixels into the file; returns its instances, encoded masks, digest and the
        checksum of what the cache holds for it."""
        example = self.source.load(i, self.encoded)
        name = self.source.names[i]
        decoded, header = tuple(int(side) for side in example.size), tuple(int(side) for side in self.sizes[i])
        if decoded != header:
            raise LeanError(f"{name}: decoded size {decoded} differs from its header {header}")
        data = np.frombuffer(example.encoded, np.uint8) if self.encoded else np.ascontiguousarray(example.pixels)
        width = 1 if self.encoded else 3
        if data.size != (self.offsets[i + 1] - self.offsets[i]) * width:
            raise LeanError(f"{name}: changed while the cache was built ({data.size} bytes, expected another size)")
        os.pwrite(self.fd, data.data, self.pixels_offset + width * int(self.offsets[i]))
        instances, masks = example.instances(), example.encoded_masks()
        return instances, masks, example.digest, image_checksum(data, masks[1], instances)


_worker_job = None


def _die_with_parent():
    """Have the kernel end this process when the one that started it dies, SIGKILL included (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _init_worker(job):
    global _worker_job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
    _die_with_parent()
    _worker_job = job
    _worker_job.open()


def _store_in_worker(i):
    return _worker_job.store(i)


def _stored(job, workers):
    """job.store(i) for every i, in order, run by `workers` processes (1 or fewer: in this one)."""
    count = len(job.source)
    if workers <= 1 or count <= 1:
        job.open()
        try:
            yield from (job.store(i) for i in range(count))
        finally:
            job.close()
        return
    # fork shares the source without pickling and starts in milliseconds; spawn where there is no fork.
    # An executor, not a Pool: a worker that dies (killed, out of memory) fails the build instead of hanging it.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(min(workers, count), context, _init_worker, (job,)) as pool:
        try:
            yield from pool.map(_store_in_worker, range(count))
        except BrokenProcessPool:
            raise LeanError("a build worker process died (out of memory?); try fewer --workers") from None
        finally:
            pool.shutdown(cancel_futures=True)


def build(source, out, workers=None, progress=True, pixels=None):
    """Write the cache of `source` to `out` atomically; returns the path.

    pixels: "raw" (decoded), "encoded" (the image files' own bytes) or None (default_pixels). The file
    is written under a temporary name beside `out` and renamed over it only when complete and synced,
    so a failure or Ctrl-C leaves any previous cache at `out` untouched and no partial file behind.
    """
    out = Path(out)
    if len(source) == 0:
        raise LeanError("the source has no images")
    check_output(out, "--out", source.files(), is_cache)
    workers = os.cpu_count() if workers is None else workers
    sizes = source.sizes()  # from headers: the layout is fixed before any pixel is decoded
    pixels = pixels or default_pixels(sizes)
    encoded = pixels == "encoded"
    lengths = source.encoded_sizes() if encoded else sizes[:, 0] * sizes[:, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LeanError(f"{out.parent}: cannot create folder ({error.strerror or error})") from None
    _remove_stale_temporaries(out)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        shape = (int(offsets[-1]),) if encoded else (int(offsets[-1]), 3)
        job = _Job(source, temporary, sizes, offsets, _allocate(temporary, shape), encoded)
        fields = {field: [] for field in INSTANCE_FIELDS}
        masks, checksums = [], []
        fingerprint = hashlib.sha256()
        meter = Progress(len(source), "build") if progress else None
        for i, (instances, encoded_masks, digest, checksum) in enumerate(_stored(job, workers)):
            for field in INSTANCE_FIELDS:
                fields[field].append(instances[field])
            masks.append(encoded_masks)
            checksums.append(checksum)
            fingerprint.update(source.names[i].encode() + b"\0" + digest)
            if meter:
                meter.update()
        with h5py.File(temporary, "r+") as handle:
            _write_index(handle, source, sizes, offsets, fields, masks)
            handle.create_dataset("checksums", data=np.array(checksums, dtype=np.uint8).reshape(-1, 32))
            handle.attrs.update(
                format=FORMAT,
                version=VERSION,
                fingerprint=fingerprint.hexdigest(),
                params=json.dumps(source.params()),
                classes=json.dumps(list(source.classes)),
                category_ids=json.dumps([int(c) for c in source.category_ids]),
                pixels=pixels,
                box_end=source.box_end,
                has_masks=bool(source.masks),
                skipped=json.dumps(source.skipped),
            )
        with open(temporary, "rb+") as synced:
            os.fsync(synced.fileno())  # the rename below must never expose a file still only half on disk
        os.replace(temporary, out)
    except OSError as error:
        raise LeanError(f"{out}: cannot write cache ({error.strerror or error})") from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even the unlink of nothing
            temporary.unlink(missing_ok=True)
    return out


def _remove_stale_temporaries(out):
    """Remove the temporary files of builds of `out` whose process is gone (killed before it could)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        pid = stale.name[len(out.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _allocate(path, shape):
    """Create the file with the pixels dataset allocated but unwritten; returns its byte offset."""
    with h5py.File(path, "w") as handle:
        layout = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        layout.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # a fixed offset now, for the workers to write at
        layout.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written by a worker
        handle.create_dataset("pixels", shape, np.uint8, dcpl=layout)
        return handle["pixels"].id.get_offset()


def _write_index(handle, source, sizes, offsets, fields, masks):
    counts = [len(labels) for labels in fields["labels"]]
    handle.create_dataset("names", data=np.array(source.names, dtype=h5py.string_dtype()))
    handle.create_dataset("source_ids", data=np.array(source.source_ids(), dtype=np.int64))
    handle.create_dataset("sizes", data=sizes)
    handle.create_dataset("pixel_offsets", data=offsets)
    handle.create_dataset("instance_offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    for field, values in fields.items():  # per-image arrays keep their dtype and shape even when empty
        handle.create_dataset(field, data=np.concatenate(values))
    crops = np.concatenate([crop for crop, _, _ in masks]).reshape(-1, 4).astype(np.int64)
    lengths = np.concatenate([np.diff(mask_offsets) for _, _, mask_offsets in masks]).astype(np.int64)
    handle.create_dataset("mask_crops", data=crops)
    handle.create_dataset("mask_offsets", data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    handle.create_dataset("mask_bits", data=np.concatenate([bits for _, bits, _ in masks]).astype(np.uint8))
