"""A COCO-format dataset as a source: the JSON that annotation tools export (CVAT, Label Studio, Roboflow,
labelme converters) and the folder of its images.

Targets, as torchvision's references convert COCO: each image's instances in the file's order; masks
exactly as pycocotools' annToMask rasterises polygons (one or several rings), uncompressed and
compressed RLE; boxes from `bbox` as [x, y, x + w, y + h] clipped to the image; `area` as the file
gives it (pycocotools' evaluation of the file uses it), from the mask where it is missing; `iscrowd`
from the file. Labels number the categories 1..K in id order, so two files with the same categories
(a train and a valid export) get the same labels; a placeholder category that no annotation uses and
that is the supercategory of all the others (Roboflow writes one) gets none.

Detection exports (no `segmentation`, or null, or []) give instances of boxes alone, their area from
the file or the box. A file where every instance has a mask gives a cache with masks; one where any
instance has none gives a cache of boxes alone (a Faster R-CNN's data), the masks of the others left
out and counted: a Mask R-CNN cannot learn from instances without masks, and mixing the two would
teach it that those objects are background.

Skipped, and counted (as detectron2 does): rings of fewer than 3 points (an annotation left with no
ring), annotations whose mask is empty, boxes with no area left after clipping. Anything else that is
wrong is one line naming the file and the place in it.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from lean import masks as mask_codec
from lean.coco_fields import field, integer, number, read_json, record_list
from lean.errors import LeanError
from lean.example import Example
from lean.images import read_header, read_rgb

SKIP_FEW_POINTS = "annotations whose polygons all have fewer than 3 points"
SKIP_EMPTY_MASK = "annotations whose mask is empty"
SKIP_NO_BOX = "annotations whose box has no area left inside the image"
SKIP_MIXED_MASKS = ("masks, as {boxes_alone} other annotations have none (the cache holds boxes alone: train it with "
                    "--task detect)")  # fmt: skip


class CocoSource:
    kind = "coco"
    box_end = "exclusive"

    def __init__(self, annotations, images=None):
        self.path = Path(annotations)
        self.folder = Path(images) if images is not None else self.path.parent
        if not self.folder.is_dir():
            raise LeanError(f"{self.folder}: no such folder of images")
        data = read_json(self.path)
        self.skipped = Counter()
        categories = _categories(data, self.path)
        annotations = record_list(data, "annotations", self.path)
        for k, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                raise LeanError(f"{self.path}: annotations[{k}] is not an object")
        used = {integer(a, "category_id", self.path, f"annotations[{k}]") for k, a in enumerate(annotations)}
        placeholder = _placeholder(categories, used)
        if placeholder is not None:
            self.skipped[f"placeholder category {placeholder['id']} {placeholder['name']!r} (no annotation uses it; "
                         "it is the supercategory of the others)"] = 1  # fmt: skip
        kept = [c for c in categories if c is not placeholder]
        self.classes = tuple(c["name"] for c in kept)
        self.category_ids = tuple(c["id"] for c in kept)
        label_of = {c["id"]: label for label, c in enumerate(kept, start=1)}
        self.images = _images(data, self.path, self.folder)
        self.names = [image["file_name"] for image in self.images]
        index_of = {image["id"]: i for i, image in enumerate(self.images)}
        self.annotations = [[] for _ in self.images]  # per image, in the file's order: (annotation, its place)
        for k, annotation in enumerate(annotations):
            place = f"annotations[{k}]"
            image_id = integer(annotation, "image_id", self.path, place)
            if image_id not in index_of:
                raise LeanError(f"{self.path}: {place}.image_id: no image has id {image_id}")
            category = integer(annotation, "category_id", self.path, place)
            if category not in label_of:
                raise LeanError(f"{self.path}: {place}.category_id: no category has id {category}")
            image = self.images[index_of[image_id]]
            instance = _instance(annotation, image, self.path, place, self.skipped)
            if instance is not None:
                self.annotations[index_of[image_id]].append({**instance, "label": label_of[category]})
        instances = [instance for image_instances in self.annotations for instance in image_instances]
        boxes_alone = sum(instance["rle"] is None for instance in instances)
        self.masks = not boxes_alone  # every instance has its mask, or the cache holds boxes alone
        if boxes_alone and len(instances) > boxes_alone:
            self.skipped[SKIP_MIXED_MASKS.format(boxes_alone=boxes_alone)] = len(instances) - boxes_alone
        self.skipped = {why: count for why, count in self.skipped.items() if count}

    def __len__(self):
        return len(self.images)

    def params(self):
        return {"source": self.kind, "annotations": str(self.path.resolve()), "images": str(self.folder.resolve())}

    def source_ids(self):
        return [image["id"] for image in self.images]

    def sizes(self):
        """(N, 2) int64 (height, width) from the JSON, checked against each file's header."""
        sizes = np.array([(image["height"], image["width"]) for image in self.images], dtype=np.int64).reshape(-1, 2)
        for image, (height, width) in zip(self.images, sizes):
            found = read_header(image["path"])[:2]
            if found != (height, width):
                place = f"{self.path} gives {image['place']} as {width}x{height}"
                raise LeanError(f"{image['path']}: is {found[1]}x{found[0]} but {place}")
        return sizes

    def files(self):
        return [self.path, *(image["path"] for image in self.images)]

    def encoded_sizes(self):
        return np.array([image["path"].stat().st_size for image in self.images], dtype=np.int64)

    def load(self, i, encoded=False):
        image = self.images[i]
        try:
            data = image["path"].read_bytes()
        except OSError as error:
            raise LeanError(f"{image['path']}: cannot read ({error.strerror or error})") from None
        pixels = read_rgb(data, image["path"])  # decoded either way: a file that does not decode is refused now
        height, width = image["height"], image["width"]
        if pixels.shape[:2] != (height, width):
            raise LeanError(f"{image['path']}: decodes to {pixels.shape[1]}x{pixels.shape[0]}, not {width}x{height}")
        instances = self.annotations[i]
        if self.masks:
            parts = mask_codec.encode(mask_util.decode(instance["rle"]) for instance in instances)  # one at a time
        else:
            parts = mask_codec.no_masks(len(instances))
        described = json.dumps([{key: v for key, v in instance.items() if key != "rle"} for instance in instances])
        described += "" if self.masks else " boxes alone"
        digest = hashlib.sha256(hashlib.sha256(data).digest() + described.encode()).digest()
        return Example(
            (height, width),
            None,
            np.array([instance["box"] for instance in instances], dtype=np.float32).reshape(-1, 4),
            np.array([instance["area"] for instance in instances], dtype=np.float32),
            np.array([instance["label"] for instance in instances], dtype=np.int64),
            np.array([instance["iscrowd"] for instance in instances], dtype=np.int64),
            digest,
            pixels=None if encoded else pixels,
            encoded=data if encoded else None,
            mask_parts=parts,
        )


def _categories(data, path):
    categories = []
    for k, category in enumerate(record_list(data, "categories", path)):
        place = f"categories[{k}]"
        if not isinstance(category, dict):
            raise LeanError(f"{path}: {place} is not an object")
        name = field(category, "name", path, place)
        categories.append({"id": integer(category, "id", path, place), "name": str(name),
                           "supercategory": category.get("supercategory")})  # fmt: skip
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise LeanError(f"{path}: categories: id {Counter(ids).most_common(1)[0][0]} is given twice")
    if not categories:
        raise LeanError(f"{path}: categories: none")
    categories = sorted(categories, key=lambda c: c["id"])
    names = Counter(c["name"] for c in categories)
    for category in categories:  # a name two categories share is told apart by id, in every table and file
        if names[category["name"]] > 1:
            category["name"] = f"{category['name']} (id {category['id']})"
    return categories


def _placeholder(categories, used):
    """The category no annotation uses and whose name is every other category's supercategory, if any."""
    for category in categories:
        others = [c for c in categories if c is not category]
        if category["id"] not in used and others and all(c["supercategory"] == category["name"] for c in others):
            return category
    return None


def _images(data, path, folder):
    images, seen = [], set()
    root = folder.resolve()
    for k, record in enumerate(record_list(data, "images", path)):
        place = f"images[{k}]"
        if not isinstance(record, dict):
            raise LeanError(f"{path}: {place} is not an object")
        image_id = integer(record, "id", path, place)
        if not -(2**63) <= image_id < 2**63:  # the cache keeps ids as int64
            raise LeanError(f"{path}: {place}.id: {image_id} is past the 64-bit range lean keeps ids in")
        if image_id in seen:
            raise LeanError(f"{path}: {place}.id: {image_id} is given twice")
        seen.add(image_id)
        name = field(record, "file_name", path, place)
        if not isinstance(name, str) or not name:
            raise LeanError(f"{path}: {place}.file_name: {name!r} is not a file name")
        try:
            file = (folder / name).resolve()
        except (OSError, RuntimeError):  # a loop of symbolic links
            raise LeanError(f"{folder / name}: cannot be followed to a file (a loop of links?)") from None
        if not file.is_relative_to(root):  # no path from a data file leaves its folder
            raise LeanError(f"{path}: {place}.file_name: {name!r} is outside {folder}")
        if not file.is_file():
            raise LeanError(f"{folder / name}: no such image file ({path} lists it as {place})")
        height, width = integer(record, "height", path, place), integer(record, "width", path, place)
        if height < 1 or width < 1:
            raise LeanError(f"{path}: {place}: size {width}x{height} is empty")
        images.append({"id": image_id, "file_name": name, "path": folder / name, "height": height, "width": width,
                       "place": place})  # fmt: skip
    return images


def _instance(annotation, image, path, place, skipped):
    """An annotation's RLE (None where it has no segmentation: a detection export's box alone), box, area and
    iscrowd, or None where it is skipped (counted in `skipped`)."""
    height, width = image["height"], image["width"]
    segmentation = annotation.get("segmentation")
    if segmentation in (None, []):  # missing, null or [], as detection exports write it
        if "bbox" not in annotation:
            raise LeanError(f"{path}: {place}: neither a bbox nor a segmentation")
        rle = mask_area = None
    else:
        rle = _rle(segmentation, height, width, path, f"{place}.segmentation", skipped)
        if rle is None:
            return None
        mask_area = int(mask_util.area(rle))
        if mask_area == 0:
            skipped[SKIP_EMPTY_MASK] += 1
            return None
    if "bbox" in annotation:
        box = annotation["bbox"]
        if not isinstance(box, list) or len(box) != 4:
            raise LeanError(f"{path}: {place}.bbox: {box!r} is not [x, y, width, height]")
        x, y, w, h = (number(v, path, f"{place}.bbox") for v in box)
    else:
        x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
    x0, x1 = min(max(x, 0), width), min(max(x + w, 0), width)
    y0, y1 = min(max(y, 0), height), min(max(y + h, 0), height)
    if x1 <= x0 or y1 <= y0:
        skipped[SKIP_NO_BOX] += 1
        return None
    if "area" in annotation:
        area = number(annotation["area"], path, f"{place}.area")
    else:  # the mask's, or the box's where there is none
        area = mask_area if rle is not None else (x1 - x0) * (y1 - y0)
    if area < 0:  # pycocotools would leave the object out of every area range
        raise LeanError(f"{path}: {place}.area: {area!r} is negative")
    crowd = annotation.get("iscrowd", 0)
    crowd = crowd if isinstance(crowd, bool) else number(crowd, path, f"{place}.iscrowd")  # "1" as 1, like the rest
    if crowd not in (0, 1):  # True and False are 1 and 0
        raise LeanError(f"{path}: {place}.iscrowd: {annotation.get('iscrowd')!r} is neither 0 nor 1")
    return {"rle": rle, "box": [x0, y0, x1, y1], "area": float(area), "iscrowd": int(crowd)}


def _rle(segmentation, height, width, path, place, skipped):
    """pycocotools' RLE of a segmentation, as annToRLE makes it; None for polygons of fewer than 3 points."""
    if isinstance(segmentation, list):
        rings = []
        for r, ring in enumerate(segmentation):
            if not isinstance(ring, list) or len(ring) % 2:
                raise LeanError(f"{path}: {place}[{r}]: a polygon is a flat list of x, y pairs")
            rings.append([float(number(v, path, f"{place}[{r}]")) for v in ring])
            _check_reach(rings[-1], height, width, path, f"{place}[{r}]")
        rings = [ring for ring in rings if len(ring) >= 6]
        if not rings:
            skipped[SKIP_FEW_POINTS] += 1
            return None
        return mask_util.merge(mask_util.frPyObjects(rings, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if not isinstance(size, list) or [number(v, path, f"{place}.size") for v in size] != [height, width]:
            raise LeanError(f"{path}: {place}.size: {size!r}, but the image is {height} x {width} (height, width)")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise LeanError(f"{path}: {place}.counts: not run lengths covering the {height} x {width} image")
            return mask_util.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            runs = _runs(counts)  # pycocotools' decoder trusts its input: read and check the runs first
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                raise LeanError(f"{path}: {place}.counts: not a compressed RLE of the {height} x {width} image")
            return {"size": [height, width], "counts": counts.encode("ascii")}
    raise LeanError(f"{path}: {place}: neither polygons nor RLE")


def _check_reach(ring, height, width, path, place):
    """One line for a polygon point far outside its image: pycocotools walks every edge pixel by pixel, so a stray
    1e30 would take all the memory there is; tools write points at most a little past the edges."""
    reach = 2 * max(height, width)
    for x, y in zip(ring[0::2], ring[1::2]):
        if not (-reach <= x <= width + reach and -reach <= y <= height + reach):
            raise LeanError(f"{path}: {place}: point ({x:g}, {y:g}) lies far outside the {height} x {width} image "
                            "(more than twice its longer side past an edge)")  # fmt: skip


def _runs(counts):
    """The run lengths a compressed RLE string holds (pycocotools' rleFrString), or None if it is not one."""
    runs, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts) or not 48 <= ord(counts[p]) < 48 + 64:
                return None
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs
