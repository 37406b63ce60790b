"""Detection targets derived from an instance-id map: pure numpy functions, no I/O.

An instance-id map is an H x W integer array: 0 is background, every other
value is one pedestrian. The targets are exactly those of the tutorial's
PennFudanDataset, in value and dtype:

    boxes    float32 (N, 4)  [x0, y0, x1, y1]; x1, y1 are the last column/row
                             the mask covers (inclusive), as the tutorial takes them
    labels   int64   (N,)    ones: one class, person
    area     float32 (N,)    (y1 - y0) * (x1 - x0), the tutorial's formula
    iscrowd  int64   (N,)    zeros
    masks    uint8   (N, H, W)

Instances come in increasing id order. An image with no pedestrian gives
empty arrays of the right shape instead of the tutorial's crash.
"""

import numpy as np

# The cache stores instance maps as uint8, renumbered 1..N: at most this many per image.
MAX_INSTANCES = np.iinfo(np.uint8).max


class TooManyInstances(ValueError):
    pass


def instance_ids(id_map):
    """The distinct non-zero ids of `id_map`, sorted."""
    if id_map.dtype in (np.uint8, np.uint16):  # counting the foreground beats sorting every pixel
        return np.flatnonzero(np.bincount(id_map[id_map != 0])).astype(id_map.dtype)
    present = np.unique(id_map)
    return present[present != 0]


def compact_instance_map(id_map):
    """Renumber the ids of `id_map` to 1..N in increasing order of the original ids.

    Returns a uint8 map with the same masks in the same order, so it can
    stand in for the original in every target function below; a map that is
    compact already is returned as it is.
    """
    ids = instance_ids(id_map)
    if len(ids) > MAX_INSTANCES:
        raise TooManyInstances(f"{len(ids)} instances, more than the {MAX_INSTANCES} a uint8 instance map holds")
    if id_map.dtype == np.uint8 and (len(ids) == 0 or ids[-1] == len(ids)):
        return id_map
    if id_map.dtype in (np.uint8, np.uint16):
        lookup = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, dtype=np.uint8)
        lookup[ids] = np.arange(1, len(ids) + 1)
        return lookup[id_map]
    compact = (np.searchsorted(ids, id_map) + 1).astype(np.uint8)
    compact[id_map == 0] = 0
    return compact


def boxes_of(id_map, ids):
    """(N, 4) float32 boxes [x0, y0, x1, y1], inclusive of the last row and column."""
    boxes = np.zeros((len(ids), 4), dtype=np.float32)
    for n, instance in enumerate(ids):
        inside = id_map == instance
        rows = np.flatnonzero(inside.any(axis=1))
        cols = np.flatnonzero(inside.any(axis=0))
        boxes[n] = cols[0], rows[0], cols[-1], rows[-1]
    return boxes


def boxes_of_masks(masks):
    """(N, 4) float32 boxes [x0, y0, x1, y1] of N x H x W masks, inclusive as boxes_of's."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for n, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[n] = cols[0], rows[0], cols[-1], rows[-1]
    return boxes


def areas_of(boxes):
    """The tutorial's box area, (y1 - y0) * (x1 - x0): zero for a one-pixel-thin instance."""
    return ((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0])).astype(np.float32)


def is_degenerate(boxes):
    """True where a box has zero width or height, which Mask R-CNN's training rejects."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def masks_of(id_map, ids):
    """(N, H, W) uint8 binary masks, one per id."""
    ids = np.asarray(ids, dtype=id_map.dtype)
    return (id_map[None, :, :] == ids[:, None, None]).view(np.uint8)  # bool and uint8 share a layout: no copy


def instance_targets(id_map):
    """Everything per instance except the masks: the part the cache stores as arrays."""
    ids = instance_ids(id_map)
    boxes = boxes_of(id_map, ids)
    return {
        "boxes": boxes,
        "labels": np.ones(len(ids), dtype=np.int64),
        "area": areas_of(boxes),
        "iscrowd": np.zeros(len(ids), dtype=np.int64),
    }


def targets(id_map, image_id):
    """The tutorial's full target dict for one image, as numpy arrays."""
    target = instance_targets(id_map)
    target["masks"] = masks_of(id_map, instance_ids(id_map))
    target["image_id"] = np.array([image_id], dtype=np.int64)
    return target


def flip_boxes(boxes, width):
    """Boxes of the horizontally mirrored image, keeping the inclusive convention.

    Works on numpy arrays and torch tensors alike; returns new memory.
    """
    flipped = (width - 1) - boxes[:, [2, 1, 0, 3]]
    flipped[:, [1, 3]] = boxes[:, [1, 3]]
    return flipped
