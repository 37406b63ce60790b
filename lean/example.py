"""What a source gives for one image: its pixels (decoded, or the image file's own bytes) and its instances.

Every source (Penn-Fudan folders, the synthetic set, COCO files) turns each image into an Example; the
cache stores Examples and nothing else, so all sources reach training the same way.
"""

from dataclasses import dataclass

import numpy as np

from lean import masks as mask_codec
from lean.targets import instance_ids, instance_targets


@dataclass
class Example:
    """One image. `masks` N x H x W uint8, one per instance (they may overlap), in target order, or None where
    `mask_parts` holds them as the cache stores them (lean.masks.encode: a source with many instances to an
    image encodes them one at a time); `boxes` (N, 4) float32 [x0, y0, x1, y1]; `area` float32, `labels` and
    `iscrowd` int64, each (N,); `digest`: a sha256 of the bytes it came from. `pixels` H x W x 3 uint8 and/or
    `encoded`, the file's bytes."""

    size: tuple
    masks: np.ndarray
    boxes: np.ndarray
    area: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    digest: bytes
    pixels: np.ndarray | None = None
    encoded: bytes | None = None
    mask_parts: tuple | None = None

    def instances(self):
        return {"boxes": self.boxes, "area": self.area, "labels": self.labels, "iscrowd": self.iscrowd}

    def encoded_masks(self):
        """(crops, bits, offsets) of the masks, as the cache stores them."""
        return self.mask_parts if self.mask_parts is not None else mask_codec.encode(self.masks)


def from_instance_map(id_map, digest, pixels=None, encoded=None):
    """The Example of an image whose instances are an id map (0 background), with the tutorial's targets."""
    fields = instance_targets(id_map)
    parts = mask_codec.encode(id_map == instance for instance in instance_ids(id_map))
    return Example(id_map.shape[:2], None, **fields, digest=digest, pixels=pixels, encoded=encoded, mask_parts=parts)
