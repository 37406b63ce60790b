"""Build a cache from a source: workers decode straight into the file, which is renamed into place when whole.

The two big datasets are allocated first, at fixed offsets in a temporary
file; each worker process writes the pixels of the examples it decodes
straight to their place in it, so no image crosses a pipe. The parent collects only
the small per-instance arrays, writes them with the index, and renames the
finished file over the destination.
"""

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

from lean.cache.format import FORMAT, INSTANCE_FIELDS, VERSION
from lean.errors import LeanError
from lean.progress import Progress
from lean.targets import instance_targets


def derive(source, i):
    """Everything the cache holds for example i: (pixels, instance map, instance targets, digest)."""
    pixels, id_map, digest = source.load(i)
    return pixels, id_map, instance_targets(id_map), digest


class _Job:
    """One build's shared state: the source, the layout, and the temporary file to write pixels into."""

    def __init__(self, source, path, sizes, offsets, byte_offsets):
        self.source, self.sizes, self.offsets = source, sizes, offsets
        self.path, self.byte_offsets = path, byte_offsets
        self.fd = None

    def open(self):
        self.fd = os.open(self.path, os.O_WRONLY)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def store(self, i):
        """Derive example i, write its pixels into the file, return its instance targets and digest."""
        image, id_map, targets, digest = derive(self.source, i)
        if image.shape[:2] != tuple(self.sizes[i]):
            raise LeanError(
                f"{self.source.names[i]}: decoded size {image.shape[:2]} differs from its header {tuple(self.sizes[i])}"
            )
        start = int(self.offsets[i])
        os.pwrite(self.fd, np.ascontiguousarray(image).data, self.byte_offsets["pixels"] + 3 * start)
        os.pwrite(self.fd, np.ascontiguousarray(id_map).data, self.byte_offsets["instance_maps"] + start)
        return targets, digest


_worker_job = None


def _init_worker(job):
    global _worker_job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
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


def build(source, out, workers=None, progress=True):
    """Write the cache of `source` to `out` atomically; returns the path.

    The file is written under a temporary name beside `out` and renamed over
    it only when complete and synced, so a failure or Ctrl-C leaves any
    previous cache at `out` untouched and no partial file behind.
    """
    out = Path(out)
    if len(source) == 0:
        raise LeanError("the source has no images")
    workers = os.cpu_count() if workers is None else workers
    sizes = source.sizes()  # from headers: the layout is fixed before any pixel is decoded
    offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])]).astype(np.int64)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LeanError(f"{out.parent}: cannot create folder ({error.strerror or error})") from None
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        job = _Job(source, temporary, sizes, offsets, _allocate(temporary, int(offsets[-1])))
        fields = {field: [] for field in INSTANCE_FIELDS}
        fingerprint = hashlib.sha256()
        meter = Progress(len(source), "build") if progress else None
        for i, (targets, digest) in enumerate(_stored(job, workers)):
            for field in INSTANCE_FIELDS:
                fields[field].append(targets[field])
            fingerprint.update(source.names[i].encode() + b"\0" + digest)
            if meter:
                meter.update()
        with h5py.File(temporary, "r+") as handle:
            _write_index(handle, source, sizes, offsets, fields)
            handle.attrs.update(
                format=FORMAT, version=VERSION, fingerprint=fingerprint.hexdigest(), params=json.dumps(source.params())
            )
        with open(temporary, "rb+") as synced:
            os.fsync(synced.fileno())  # the rename below must never expose a file still only half on disk
        os.replace(temporary, out)
    except OSError as error:
        raise LeanError(f"{out}: cannot write cache ({error.strerror or error})") from None
    finally:
        temporary.unlink(missing_ok=True)
    return out


def _allocate(path, total):
    """Create the file with its two big datasets allocated but unwritten; returns their byte offsets."""
    with h5py.File(path, "w") as handle:
        for name, shape in (("pixels", (total, 3)), ("instance_maps", (total,))):
            layout = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            layout.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # a fixed offset now, for the workers to write at
            layout.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written by a worker
            handle.create_dataset(name, shape, np.uint8, dcpl=layout)
        return {name: handle[name].id.get_offset() for name in ("pixels", "instance_maps")}


def _write_index(handle, source, sizes, offsets, fields):
    counts = [len(labels) for labels in fields["labels"]]
    handle.create_dataset("names", data=np.array(source.names, dtype=h5py.string_dtype()))
    handle.create_dataset("sizes", data=sizes)
    handle.create_dataset("pixel_offsets", data=offsets)
    handle.create_dataset("instance_offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    for field, values in fields.items():  # per-image arrays keep their dtype and shape even when empty
        handle.create_dataset(field, data=np.concatenate(values))
