"""A generated COCO-format dataset for the benchmark: JPEG photos of about a megapixel and a half, each with
overlapping polygons of three categories, written as an annotation tool would write them.

Identical for identical arguments. The pictures are smooth gradients with noise and the shapes filled
in, so that they compress as photos do (a few hundred KB each), not as noise.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "car", "supercategory": "thing"}, {"id": 2, "name": "tree", "supercategory": "thing"},
              {"id": 3, "name": "sign", "supercategory": "thing"}]  # fmt: skip


def generate(folder, count=500, height=1024, width=1280, seed=0):
    """Write `count` JPEGs and folder/annotations.json; returns the JSON's path (reused if already written)."""
    folder = Path(folder)
    path = folder / "annotations.json"
    if path.exists():
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        picture, shapes = _picture(rng, height, width)
        name = f"images/{index:05d}.jpg"
        picture.save(folder / name, format="JPEG", quality=90)
        images.append({"id": 1000 + index, "file_name": name, "width": width, "height": height})
        for category, points in shapes:
            xs, ys = np.array(points[0::2]), np.array(points[1::2])
            x0, y0 = max(float(xs.min()), 0.0), max(float(ys.min()), 0.0)
            x1, y1 = min(float(xs.max()), float(width)), min(float(ys.max()), float(height))
            area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))  # the shoelace formula
            annotations.append({"id": len(annotations) + 1, "image_id": 1000 + index, "category_id": category,
                                "segmentation": [points], "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area,
                                "iscrowd": 0})  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def _picture(rng, height, width):
    small = rng.uniform(0, 255, (height // 64, width // 64, 3)).astype(np.uint8)
    picture = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    noise = rng.normal(0, 6, (height // 4, width // 4, 1))
    picture = Image.fromarray(
        np.clip(np.asarray(picture) + np.kron(noise, np.ones((4, 4, 1))), 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(picture, "RGBA")
    shapes = []
    for _ in range(rng.integers(2, 9)):
        category = int(rng.integers(1, 4))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.3) * min(height, width)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(6, 20))))
        radii = radius * rng.uniform(0.6, 1.0, len(angles))
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        draw.polygon([tuple(p) for p in points], fill=(*rng.integers(0, 256, 3).tolist(), 170))
        shapes.append((category, [round(float(v), 2) for v in points.reshape(-1)]))
    return picture.convert("RGB"), shapes
