"""A generated dataset: pedestrian-like figures on textured backgrounds, and with --classes K, K kinds of figure.

Identical for identical (num_images, seed, classes): each image is a pure
function of (seed, index), so build workers can make their share
independently. With one class (the default), figures are upright (head,
torso, two legs) and vary in size, colour and texture; 0 to 6 per image,
nearer ones (lower feet) drawn over farther ones, some cut by the image
border: a PennFudan-like set. With K classes, figures of K kinds (person,
disc, triangle, cross, block) are drawn translucent, so where they overlap
both show, and each instance's mask is its whole figure: masks overlap;
with --rare R the last kind is drawn R times less often than each other
kind (a long-tailed set, for rare-class sampling).
Small images and strong shapes make either learnable by Mask R-CNN from
scratch in minutes on a CPU.
"""

import dataclasses
import hashlib
import io

import numpy as np
from PIL import Image

from lean import masks as mask_codec
from lean.example import Example, from_instance_map
from lean.targets import areas_of, boxes_of_masks, compact_instance_map

MIN_SIDE, MAX_SIDE = 128, 224
MAX_FIGURES = 6
KINDS = ("person", "disc", "triangle", "cross", "block")  # blocks last: the background's clutter is blocks too
OPACITY = 0.65  # of a figure drawn over others, with --classes K: what lies under it still shows


def _rng(seed, index):
    return np.random.default_rng([seed, index])


def image_size(seed, index):
    """(height, width) of synthetic image `index`, without drawing it."""
    height, width = _rng(seed, index).integers(MIN_SIDE, MAX_SIDE + 1, size=2)
    return int(height), int(width)


def synthesize(seed, index):
    """(H x W x 3 uint8 image, H x W uint8 instance-id map) of synthetic image `index`."""
    rng = _rng(seed, index)
    height, width = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, rows, cols)
    id_map = np.zeros((height, width), dtype=np.uint8)

    figures = [_figure_layout(rng, height, width) for _ in range(rng.integers(0, MAX_FIGURES + 1))]
    figures.sort(key=lambda figure: figure["feet"])  # far (high feet) first, near ones painted over
    for instance, figure in enumerate(figures, start=1):
        for part, colour in _figure_parts(rng, figure, rows, cols):
            texture = rng.normal(0, figure["texture"], size=3) * np.sin(rows * figure["stripe"])[..., None]
            image[part] = np.clip(colour + texture[part], 0, 255)
            id_map[part] = instance
    return image.astype(np.uint8), compact_instance_map(id_map)  # a figure may be hidden entirely


def _background(rng, rows, cols):
    height, width = rows.shape
    base = rng.uniform(40, 215, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    image = base + tilt[0] * (rows / height)[..., None] + tilt[1] * (cols / width)[..., None]
    for _ in range(rng.integers(2, 6)):  # clutter: blocks of other colours
        r0, c0 = rng.integers(0, height), rng.integers(0, width)
        r1, c1 = r0 + rng.integers(8, height // 2), c0 + rng.integers(8, width // 2)
        image[r0:r1, c0:c1] = rng.uniform(0, 255, size=3)
    image += rng.normal(0, rng.uniform(2, 14), size=image.shape)
    return np.clip(image, 0, 255).astype(np.float32)


def _figure_layout(rng, height, width):
    tall = rng.uniform(0.35, 0.95) * height
    return {
        "tall": tall,
        "wide": tall * rng.uniform(0.28, 0.42),
        "centre": rng.uniform(-0.05, 1.05) * width,  # some figures are cut by the left or right border
        "feet": rng.uniform(0.55, 1.1) * height,  # and some by the bottom
        "texture": rng.uniform(0, 30),
        "stripe": rng.uniform(0.2, 1.5),
    }


def _figure_parts(rng, figure, rows, cols):
    """Boolean masks and colours of head, torso and legs."""
    tall, wide, x, feet = figure["tall"], figure["wide"], figure["centre"], figure["feet"]
    top = feet - tall
    head_r = tall * 0.09
    head_y = top + head_r
    torso_top, torso_bottom = top + 2 * head_r, top + tall * 0.58
    leg_w = wide * 0.11
    head = ((rows - head_y) / head_r) ** 2 + ((cols - x) / (head_r * 0.85)) ** 2 <= 1
    torso = (rows >= torso_top) & (rows < torso_bottom) & (np.abs(cols - x) <= wide / 2)
    legs = (rows >= torso_bottom) & (rows < feet) & (np.abs(np.abs(cols - x) - wide * 0.22) <= leg_w)
    skin = rng.uniform([120, 80, 60], [240, 200, 170])
    return [(head, skin), (torso, rng.uniform(0, 255, size=3)), (legs, rng.uniform(0, 255, size=3))]


def synthesize_classes(seed, index, classes, rare=1):
    """(H x W x 3 uint8 image, N x H x W uint8 masks, (N,) int64 labels 1..classes) of image `index`: figures of
    `classes` kinds, translucent, their masks whole where they overlap; the last kind `rare` times less often."""
    rng = _rng([seed, classes] if rare == 1 else [seed, classes, rare], index)
    shares = np.array([1.0] * (classes - 1) + [1.0 / rare]) / (classes - 1 + 1.0 / rare)
    height, width = image_size(seed, index)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, rows, cols)
    masks, labels = [], []
    for _ in range(rng.integers(0, MAX_FIGURES + 1)):
        label = int(rng.integers(1, classes + 1) if rare == 1 else rng.choice(classes, p=shares) + 1)
        figure = _figure_layout(rng, height, width)
        shape = _shape(KINDS[label - 1], rng, figure, rows, cols)
        if not shape.any():  # wholly outside the image
            continue
        colour = rng.uniform(0, 255, size=3)
        texture = rng.normal(0, figure["texture"], size=3) * np.sin(rows * figure["stripe"])[..., None]
        image[shape] = (1 - OPACITY) * image[shape] + OPACITY * np.clip(colour + texture[shape], 0, 255)
        masks.append(shape)
        labels.append(label)
    masks = np.array(masks, dtype=np.uint8).reshape(-1, height, width)
    return image.astype(np.uint8), masks, np.array(labels, dtype=np.int64)


def _shape(kind, rng, figure, rows, cols):
    """The boolean mask of a figure of `kind`, laid out as `figure` (the person's layout) says."""
    if kind == "person":
        mask = np.zeros(rows.shape, dtype=bool)
        for part, _ in _figure_parts(rng, figure, rows, cols):
            mask |= part
        return mask
    tall, wide, x, feet = figure["tall"], figure["wide"] * 1.6, figure["centre"], figure["feet"]
    y = feet - tall / 2  # the figure's middle
    if kind == "disc":
        return ((rows - y) / (tall / 2)) ** 2 + ((cols - x) / (wide / 2)) ** 2 <= 1
    if kind == "block":
        return (np.abs(rows - y) <= tall / 2) & (np.abs(cols - x) <= wide / 2)
    if kind == "triangle":  # apex up
        return (rows <= feet) & (np.abs(cols - x) <= (rows - (feet - tall)) * wide / (2 * tall))
    bar = min(tall, wide) / 6  # a cross
    return ((np.abs(rows - y) <= bar) & (np.abs(cols - x) <= wide / 2)) | (
        (np.abs(cols - x) <= bar) & (np.abs(rows - y) <= tall / 2)
    )


class SyntheticSource:
    kind = "synthetic"
    box_end = "inclusive"  # boxes as the Penn-Fudan source derives them

    def __init__(self, num_images, seed, classes=1, boxes_only=False, rare=1):
        if not 1 <= classes <= len(KINDS):
            raise ValueError(f"{classes} classes: the synthetic source draws 1 to {len(KINDS)} kinds of figure")
        if rare != 1 and classes < 2:
            raise ValueError("a rare class needs at least 2 classes")
        self.num_images, self.seed, self.num_classes, self.rare = int(num_images), int(seed), int(classes), int(rare)
        self.masks = not boxes_only  # with boxes_only, a detection dataset: the same figures, boxes alone
        self.classes = KINDS[: self.num_classes]
        self.category_ids = tuple(range(1, self.num_classes + 1))
        self.names = [f"Synthetic{seed:04d}_{i:05d}" for i in range(self.num_images)]
        self.skipped = {}  # every figure drawn is kept

    def __len__(self):
        return self.num_images

    def params(self):
        params = {"source": self.kind, "num_images": self.num_images, "seed": self.seed}
        if self.num_classes != 1:
            params["classes"] = self.num_classes
        if self.rare != 1:
            params["rare"] = self.rare
        return params if self.masks else {**params, "boxes_only": True}

    def source_ids(self):
        return list(range(self.num_images))

    def sizes(self):
        return np.array([image_size(self.seed, i) for i in range(self.num_images)], dtype=np.int64).reshape(-1, 2)

    def files(self):
        return []  # drawn, not read

    def encoded_sizes(self):
        return np.array([len(_png(self._pixels(i))) for i in range(self.num_images)], dtype=np.int64)

    def _pixels(self, i):
        return (
            synthesize(self.seed, i)[0]
            if self.num_classes == 1
            else synthesize_classes(self.seed, i, self.num_classes, self.rare)[0]
        )

    def load(self, i, encoded=False):
        example = self._drawn(i, encoded)
        if self.masks:
            return example
        return dataclasses.replace(example, masks=None, mask_parts=mask_codec.no_masks(len(example.boxes)),
                                   digest=hashlib.sha256(example.digest + b"boxes alone").digest())  # fmt: skip

    def _drawn(self, i, encoded):
        if self.num_classes == 1:
            image, id_map = synthesize(self.seed, i)
            digest = hashlib.sha256(image.tobytes() + id_map.tobytes()).digest()
            if encoded:
                return from_instance_map(id_map, digest, encoded=_png(image))
            return from_instance_map(id_map, digest, pixels=image)
        image, masks, labels = synthesize_classes(self.seed, i, self.num_classes, self.rare)
        boxes = boxes_of_masks(masks)
        digest = hashlib.sha256(image.tobytes() + masks.tobytes() + labels.tobytes()).digest()
        pixels, data = (None, _png(image)) if encoded else (image, None)
        crowd = np.zeros(len(labels), dtype=np.int64)
        return Example(image.shape[:2], masks, boxes, areas_of(boxes), labels, crowd, digest, pixels, data)


def _png(image):
    """The image as PNG bytes: the same bytes for the same pixels."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
