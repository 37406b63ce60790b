"""Instance masks stored one by one: each cropped to the rows and columns it covers, then bit-packed.

Pure numpy. Every instance keeps its own pixels, so instances that overlap survive bit for bit. A crop
is (y0, x0, h, w); its h x w bits, row by row, take ceil(h * w / 8) bytes. The choice of encoding,
against COCO's RLE among others, is measured in docs/cache-format.md.
"""

import numpy as np


def crop_box(mask):
    """The crop [y0, x0, h, w] of an H x W mask: the rows and columns it covers (0s if it is empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros(4, dtype=np.int64)
    return np.array([rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1], dtype=np.int64)


def crop_boxes(masks):
    """(N, 4) int64 crops [y0, x0, h, w] of N x H x W masks (crop_box of each)."""
    return np.array([crop_box(mask) for mask in masks], dtype=np.int64).reshape(-1, 4)


def encode(masks):
    """(crops (N, 4) int64, bits uint8, offsets (N+1,) int64) of N x H x W masks, or of any iterable of H x W
    masks, taken one at a time: an image of a thousand instances never holds all of them at full size at once.
    Instance n's bits are bits[offsets[n]:offsets[n + 1]]."""
    crops, packed = [], []
    for mask in masks:
        y, x, h, w = crop = crop_box(mask)
        crops.append(crop)
        packed.append(np.packbits(mask[y : y + h, x : x + w].astype(bool)))
    offsets = np.zeros(len(packed) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(bits) for bits in packed])
    bits = np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8)
    return np.array(crops, dtype=np.int64).reshape(-1, 4), bits, offsets


def no_masks(count):
    """What `encode` gives for `count` instances of boxes alone: empty crops, no bits."""
    return np.zeros((count, 4), dtype=np.int64), np.zeros(0, dtype=np.uint8), np.zeros(count + 1, dtype=np.int64)


def crop_of(bits, crop, flip=False):
    """The h x w uint8 crop that `bits` hold; `flip`: mirrored left to right, as a view whose rows are contiguous
    (the bits read backwards are the crop turned half a circle; its rows then come in reverse order), which
    copies row by row where the mirrored view of the upright crop copies byte by byte."""
    _, _, h, w = (int(v) for v in crop)
    if not flip:
        return np.unpackbits(bits, count=h * w).reshape(h, w)
    padding = 8 * len(bits) - h * w  # the last byte's unused low bits, first when read backwards
    return np.unpackbits(bits[::-1], bitorder="little")[padding:].reshape(h, w)[::-1]


def decode(crops, bits, offsets, height, width, flip=False):
    """N x H x W uint8 masks from what `encode` gave (`bits` and `offsets` for these crops); `flip`: mirrored
    left to right."""
    masks = np.zeros((len(crops), height, width), dtype=np.uint8)
    for n, crop in enumerate(crops):
        y, x, h, w = (int(v) for v in crop)
        if h == 0:
            continue
        if flip:
            x = width - x - w
        masks[n, y : y + h, x : x + w] = crop_of(bits[offsets[n] : offsets[n + 1]], crop, flip)
    return masks


def flip_crops(crops, width):
    """The crops of the masks mirrored left to right (each crop's own pixels mirrored too)."""
    flipped = crops.copy()
    flipped[:, 1] = np.where(crops[:, 2] > 0, width - crops[:, 1] - crops[:, 3], 0)
    return flipped
