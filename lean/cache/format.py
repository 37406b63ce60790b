"""The layout of a lean cache file (format version 2), and the check that a file has it.

One HDF5 file, every dataset uncompressed and contiguous so a reader can
memory-map the large ones straight from disk:

    attrs     format = "lean-cache", version = 2, fingerprint (sha256 hex of the
              source bytes), params (JSON: the source and how it was built),
              classes and category_ids (JSON: label k is classes[k - 1], the
              source's category category_ids[k - 1]), pixels ("raw" or
              "encoded"), box_end ("inclusive": x1 is the last column covered,
              the tutorial's; "exclusive": x + w, COCO's), skipped (JSON: what
              the source left out, and why, with counts), has_masks (False:
              a detection dataset's boxes alone, every crop empty, no bits;
              missing in caches built before 2026-11-29, which all have masks)
    names             (N,)     str      the source's name of each image
    source_ids        (N,)     int64    the source's id of each image
    sizes             (N, 2)   int64    (height, width)
    pixel_offsets     (N+1,)   int64    image i is [o[i], o[i+1]) of pixels: rows if
    pixels            (P, 3)   uint8    raw (RGB), bytes if
                      (B,)     uint8    encoded (the image files as they were)
    instance_offsets  (N+1,)   int64    image i owns instances [o[i], o[i+1]) of:
    boxes             (M, 4)   float32  [x0, y0, x1, y1]
    area              (M,)     float32
    labels            (M,)     int64    1..K
    iscrowd           (M,)     int64
    mask_crops        (M, 4)   int64    [y0, x0, h, w] of each instance's mask
    mask_offsets      (M+1,)   int64    instance m's mask is bytes [o[m], o[m+1]) of:
    mask_bits         (Q,)     uint8    each crop's h x w bits, row by row (lean.masks)
    checksums         (N, 32)  uint8    sha256 of each image's pixels, mask bits and instance arrays
"""

import hashlib
import os

import h5py
import numpy as np

from lean.errors import LeanError

FORMAT = "lean-cache"
VERSION = 2
INSTANCE_FIELDS = ("boxes", "area", "labels", "iscrowd")
INDEX = ("names", "source_ids", "sizes", "pixel_offsets", "instance_offsets", "mask_crops", "mask_offsets", "checksums")
MAPPED = ("pixels", "mask_bits")
DATASETS = INDEX + INSTANCE_FIELDS + MAPPED


def is_cache(path):
    """Whether the file at `path` is a lean cache of any version, or an HDF5 file too damaged to tell: what a
    build may write over (an intact HDF5 file without lean's mark is someone else's)."""
    try:
        with h5py.File(path, "r") as handle:
            return handle.attrs.get("format") == FORMAT
    except OSError:
        with open(path, "rb") as file:
            return file.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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
                f"{path}: cache format version {handle.attrs.get('version')!r}, this lean reads {VERSION}; "
                "rebuild it with python -m lean.cache build and the arguments it was built with"
            )
        missing = [name for name in DATASETS if name not in handle]
        if missing:
            raise LeanError(f"{path}: cache lacks {', '.join(missing)}; rebuild it")
        damage = _layout_damage(handle)
        if damage:
            raise LeanError(f"{path}: damaged cache ({damage}); rebuild it")
        _check_mapped(handle, path)
    except LeanError:
        handle.close()
        raise
    return handle


# Each dataset's dtype and the shape of one of its rows; pixels' rows are (3,) raw and () encoded.
LAYOUT = {
    "source_ids": (np.int64, ()),
    "sizes": (np.int64, (2,)),
    "pixel_offsets": (np.int64, ()),
    "instance_offsets": (np.int64, ()),
    "boxes": (np.float32, (4,)),
    "area": (np.float32, ()),
    "labels": (np.int64, ()),
    "iscrowd": (np.int64, ()),
    "mask_crops": (np.int64, (4,)),
    "mask_offsets": (np.int64, ()),
    "mask_bits": (np.uint8, ()),
    "checksums": (np.uint8, (32,)),
}
TEXT_ATTRIBUTES = {"fingerprint": None, "pixels": ("raw", "encoded"), "box_end": None}  # box_end's values: reader


def _layout_damage(handle):
    """What is not as this format lays it out (an attribute missing or of another kind, a dataset of another
    dtype or shape, or a group in a dataset's place), or None: a file that holds garbage under the right names
    would otherwise train on it."""
    for name, allowed in TEXT_ATTRIBUTES.items():
        value = handle.attrs.get(name)
        if not isinstance(value, str) or (allowed and value not in allowed):
            return f"attribute {name} is {value!r}"
    rows = {**LAYOUT, "pixels": (np.uint8, (3,) if handle.attrs["pixels"] == "raw" else ())}
    for name in DATASETS:
        dataset = handle[name]
        if not isinstance(dataset, h5py.Dataset):
            return f"{name} is not a dataset"
        if name == "names":
            if h5py.check_string_dtype(dataset.dtype) is None or dataset.ndim != 1:
                return "names are not a list of text"
            continue
        dtype, row = rows[name]
        if dataset.dtype != dtype or dataset.shape[1:] != row:
            shape = "(N" + "".join(f", {side}" for side in row) + ")"
            return f"{name} is {dataset.dtype} {dataset.shape}, not {np.dtype(dtype)} {shape}"
    return None


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


def image_checksum(pixels, mask_bits, instances):
    """sha256 of everything a cache holds for one image: its stored pixels, mask bits and instance arrays."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).data)
    digest.update(np.ascontiguousarray(mask_bits).data)
    for field in INSTANCE_FIELDS:
        digest.update(np.ascontiguousarray(instances[field]).data)
    return np.frombuffer(digest.digest(), dtype=np.uint8)
