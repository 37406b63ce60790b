"""The layout of a lean cache file, and the check that a file has it.

One HDF5 file, every dataset uncompressed and contiguous so a reader can
memory-map it straight from disk:

    attrs     format = "lean-cache", version, fingerprint (sha256 hex of the
              source bytes), params (JSON: the source and how it was built)
    names             (N,)     str      example names
    sizes             (N, 2)   int64    (height, width)
    pixel_offsets     (N+1,)   int64    image i covers pixels [o[i], o[i+1]) of:
    pixels            (P, 3)   uint8    RGB rows of all images, concatenated
    instance_maps     (P,)     uint8    instance ids 1..n_i (0 background), same offsets
    instance_offsets  (N+1,)   int64    image i owns instances [o[i], o[i+1]) of:
    boxes             (M, 4)   float32  [x0, y0, x1, y1], inclusive
    area              (M,)     float32
    labels            (M,)     int64
    iscrowd           (M,)     int64
"""

import os

import h5py

from lean.errors import LeanError

FORMAT = "lean-cache"
VERSION = 1
INSTANCE_FIELDS = ("boxes", "area", "labels", "iscrowd")
DATASETS = ("names", "sizes", "pixel_offsets", "pixels", "instance_maps", "instance_offsets", *INSTANCE_FIELDS)
MAPPED = ("pixels", "instance_maps")


def open_checked(path):
    """Open a cache read-only, or fail with one line saying why it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LeanError(f"{path}: no such cache file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise LeanError(f"{path}: not a readable HDF5 file (truncated, corrupt or foreign)") from None
    try:
        if handle.attrs.get("format") != FORMAT:
            raise LeanError(f"{path}: not a lean cache (HDF5 file without the {FORMAT!r} format mark)")
        if handle.attrs.get("version") != VERSION:
            raise LeanError(
                f"{path}: cache format version {handle.attrs.get('version')}, this lean reads {VERSION}; rebuild it"
            )
        missing = [name for name in DATASETS if name not in handle]
        if missing:
            raise LeanError(f"{path}: cache lacks {', '.join(missing)}; rebuild it")
        _check_mapped(handle, path)
    except LeanError:
        handle.close()
        raise
    return handle


def _check_mapped(handle, path):
    size = os.path.getsize(path)
    for name in MAPPED:
        dataset = handle[name]
        if dataset.size == 0:
            continue
        offset = dataset.id.get_offset()
        if dataset.chunks is not None or dataset.compression is not None or offset is None:
            raise LeanError(f"{path}: dataset {name} is not stored contiguously; rebuild the cache")
        if offset + dataset.size * dataset.dtype.itemsize > size:
            raise LeanError(f"{path}: file is truncated ({size} bytes, {name} needs {offset + dataset.nbytes})")


def mapped_offset(handle, name):
    """Byte offset of a contiguous dataset in its file, for np.memmap; None when it is empty."""
    return handle[name].id.get_offset()
