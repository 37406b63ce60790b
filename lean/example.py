"""What a source gives for one image: its pixels (decoded, or the image file's own bytes) and its instances.

Every source (Penn-Fudan folders, the synthetic set, COCO files) turns each image into an Example; the
cache stores Examples and nothing else, so all sources reach training the same way.
"""

from dataclasses import dataclass

import numpy as np

from lean.targets import instance_ids, instance_targets, masks_of


@dataclass
class Example:
    """One image. `masks` N x H x W uint8, one per instance (they may overlap), in target order; `boxes`
    (N, 4) float32 [x0, y0, x1, y1]; `area` float32, `labels` and `iscrowd` int64, each (N,); `digest`: a
    sha256 of the bytes it came from. `pixels` H x W x 3 uint8 and/or `encoded`, the file's bytes."""

    size: tuple
    masks: np.ndarray
    boxes: np.ndarray
    area: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    digest: bytes
    pixels: np.ndarray | None = None
    encoded: bytes | None = None

    def instances(self):
        return {"boxes": self.boxes, "area": self.area, "labels": self.labels, "iscrowd": self.iscrowd}


def from_instance_map(id_map, digest, pixels=None, encoded=None):
    """The Example of an image whose instances are an id map (0 background), with the tutorial's targets."""
    fields = instance_targets(id_map)
    masks = masks_of(id_map, instance_ids(id_map))
    return Example(id_map.shape[:2], masks, **fields, digest=digest, pixels=pixels, encoded=encoded)
