"""Write any cache back out as images and a COCO JSON, for any COCO tool to read and for lean to build again.

DIR/annotations.json lists the images by their source ids, their instances (bbox [x0, y0, x1 - x0,
y1 - y0] of the cached box, as lean's evaluation takes it; area, iscrowd; the mask as compressed RLE)
and the categories by their source ids. Each image goes to DIR/<its name>: the stored file itself
from a cache of encoded pixels, a PNG of the pixels from a raw one (photo.jpg as photo.png; where two
images would take one name, the later one gets photo-1.png). Building from the export gives the same
targets, but for instances with a zero-width or zero-height box, which a COCO source skips.

An export writes only where nothing is, or over an earlier export's own files (its annotations.json
carries lean's mark in "info" and lists them): never over a dataset's own JSON or images.
"""

import json
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from lean.errors import LeanError
from lean.files import distinct, json_or_none, write_atomically
from lean.images import SUFFIXES

MARK = "lean.cache export"


def export_coco(cache, folder, progress=None):
    """Write `cache` to `folder` (created if missing) as images and annotations.json; returns (the JSON's path,
    [(image name, the name it was written as)] for the images written under another name than their own)."""
    folder = Path(folder)
    own = [_file_name(cache, i) for i in range(len(cache))]
    names = distinct(own)
    _check_free(folder, names)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LeanError(f"{folder}: cannot create folder ({error.strerror or error})") from None
    images, annotations = [], []
    for i, name in enumerate(names):
        _write_image(cache, i, folder, name)
        height, width = (int(side) for side in cache.sizes[i])
        image_id = int(cache.source_ids[i])
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        fields = cache.instance_targets(i)
        for box, area, label, crowd, mask in zip(*fields.values(), cache.masks(i)):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotation = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cache.category_ids[int(label) - 1],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd),
            }  # fmt: skip
            if cache.has_masks:  # a cache of boxes alone exports as a detection dataset: no segmentation
                rle = mask_util.encode(np.asfortranarray(mask))
                annotation["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            annotations.append(annotation)
        if progress:
            progress.update()
    categories = [{"id": int(c), "name": name} for c, name in zip(cache.category_ids, cache.classes)]
    path = folder / "annotations.json"
    text = json.dumps({"info": {"description": MARK, "source": cache.path}, "images": images,
                       "annotations": annotations, "categories": categories})  # fmt: skip
    write_atomically(path, lambda temporary: temporary.write_text(text))
    return path, [(cache.names[i], name) for i, name in enumerate(names) if name != own[i]]


def _check_free(folder, names):
    """One line, before anything is written, where the export would write over a file it did not write: the
    folder's annotations.json, unless an earlier export wrote it, or an image that export did not list."""
    path = folder / "annotations.json"
    ours = set()
    if path.exists():
        earlier = json_or_none(path)
        if not (isinstance(earlier, dict) and isinstance(earlier.get("info"), dict) and earlier["info"].get(
                "description") == MARK):  # fmt: skip
            raise LeanError(f"--coco {folder}: holds an annotations.json that lean did not export (a dataset's own?); "
                            "export into an empty or new folder")  # fmt: skip
        ours = {image.get("file_name") for image in earlier.get("images", []) if isinstance(image, dict)}
    for name in names:
        if (folder / name).exists() and name not in ours:
            raise LeanError(f"--coco {folder}: {name} is there already and lean did not export it; export into an "
                            "empty or new folder")  # fmt: skip


def _file_name(cache, i):
    """The image's name, with the suffix of the bytes written: its own from an encoded cache, .png from a raw one."""
    name = PurePosixPath(cache.names[i])
    if name.is_absolute() or ".." in name.parts:
        raise LeanError(f"{cache.path}: image {i} is named {cache.names[i]!r}, which would leave the export folder")
    if cache.stored == "encoded":
        return str(name)
    return str(name.with_suffix(".png") if name.suffix.lower() in SUFFIXES else name.with_name(name.name + ".png"))


def _write_image(cache, i, folder, name):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if cache.stored == "encoded":
        write_atomically(path, lambda temporary: temporary.write_bytes(bytes(cache.encoded(i))))
    else:
        pixels = np.ascontiguousarray(cache.image(i))
        write_atomically(path, lambda temporary: Image.fromarray(pixels).save(temporary, format="PNG"))
