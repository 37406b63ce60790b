"""COCO datasets written to disk for the tests, as annotation tools write them."""

import json

import numpy as np
from PIL import Image


def write_coco(folder, dataset, sizes=None, image_format="PNG"):
    """Write `dataset` (a COCO dict) as folder/annotations.json, with an image of random pixels for each of its
    images at its file_name (of `sizes[file_name]` where given, else its width and height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image in dataset["images"]:
        height, width = (sizes or {}).get(image["file_name"], (image["height"], image["width"]))
        path = folder / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (int(height), int(width), 3), dtype=np.uint8)).save(
            path, format=image_format
        )
    (folder / "annotations.json").write_text(json.dumps(dataset))
    return folder / "annotations.json"


def polygon(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def dataset(annotations=(), images=None, categories=None):
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    categories = categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return {"images": images, "annotations": list(annotations), "categories": categories}


def annotation(k, image_id=1, category_id=1, segmentation=None, **fields):
    return {"id": k, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "segmentation": segmentation or [polygon(5, 5, 10, 8)], "bbox": [5, 5, 10, 8], **fields}  # fmt: skip
