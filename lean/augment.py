"""Augmentation on the batch as training takes it (lean.train --augment, --color-jitter): pure functions of
(seed, epoch, batch), so that a resumed run draws what the uninterrupted one drew.

    hflip        the tutorial's: each image flipped left-right with p = 0.5 (the loader does it, with
                 its boxes and masks)
    multiscale   hflip, and each batch's short side drawn from the references' preset, 480 to 800 in
                 steps of 32, scaled to the run's --min-size (the model's transform resizes the images,
                 boxes and masks to it)
    lsj          hflip, then large-scale jitter as the references' preset: each image scaled to fit a
                 square of side --min-size times a factor drawn from 0.1 to 2.0, then cropped at a drawn
                 place (where larger) or padded with the mean colour (where smaller) to that square;
                 boxes clipped, instances left with no width or height dropped
    color jitter brightness, contrast, saturation and hue of each image changed as the references' SSD
                 preset does (RandomPhotometricDistort's ranges); boxes and masks are untouched

Both work on the batch where it is, on the device for a GPU run, and decode nothing again.
"""

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from lean.config import AUGMENTS

BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.875, 1.125), (0.5, 1.5), (0.5, 1.5), (-0.05, 0.05)
LSJ_SCALES = (0.1, 2.0)
MEAN_COLOUR = (124, 116, 104)  # ImageNet's mean in uint8: what LSJ pads with, as the references fill with it


def multiscale_sizes(min_size):
    """The short sides multiscale draws from: the references' 480..800 by 32, scaled to `min_size` (800: theirs)."""
    return sorted({max(1, round(side * min_size / 800)) for side in range(480, 801, 32)})


def drawn(seed, epoch, batch, stream):
    """The random numbers of one batch's draws of one kind (`stream`), apart from every other batch's."""
    return np.random.default_rng([seed, epoch, batch, stream])


def short_side(seed, epoch, batch, sizes):
    return int(drawn(seed, epoch, batch, 4).choice(sizes))


def jitter_factors(seed, epoch, batch, count):
    """(brightness, contrast, saturation, hue) of each of `count` images."""
    rng = drawn(seed, epoch, batch, 5)
    return [tuple(float(rng.uniform(*span)) for span in (BRIGHTNESS, CONTRAST, SATURATION, HUE)) for _ in range(count)]


def jittered(images, factors):
    """Each uint8 image with its (brightness, contrast, saturation, hue) applied, on its device."""
    out = []
    for image, (brightness, contrast, saturation, hue) in zip(images, factors):
        image = F.adjust_brightness(image, brightness)
        image = F.adjust_contrast(image, contrast)
        image = F.adjust_saturation(image, saturation)
        out.append(F.adjust_hue(image, hue))
    return out


def jitter_placements(seed, epoch, batch, count):
    """(scale, where to crop down, where to crop across: fractions of the room there is) of each of `count`
    images."""
    rng = drawn(seed, epoch, batch, 6)
    return [(float(rng.uniform(*LSJ_SCALES)), float(rng.random()), float(rng.random())) for _ in range(count)]


def large_scale_jitter(image, target, side, scale, down, across):
    """(image, target) scaled by `scale` to fit a `side` x `side` square, then cropped (at the fractions `down`
    and `across` of the room) or padded to that square, its boxes and masks with it."""
    height, width = image.shape[-2:]
    ratio = side / max(height, width) * scale
    size = [max(1, round(height * ratio)), max(1, round(width * ratio))]
    image = F.resize(image, size, antialias=True)
    top, left = round(down * max(0, size[0] - side)), round(across * max(0, size[1] - side))
    canvas = torch.tensor(MEAN_COLOUR, dtype=image.dtype, device=image.device)[:, None, None].repeat(1, side, side)
    kept = image[:, top : top + side, left : left + side]
    canvas[:, : kept.shape[1], : kept.shape[2]] = kept
    scales = torch.tensor([size[1] / width, size[0] / height] * 2, device=image.device)
    shift = torch.tensor([left, top] * 2, dtype=torch.float32, device=image.device)
    boxes = target["boxes"] * scales - shift
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([kept.shape[2], kept.shape[1]] * 2, device=image.device))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = {**target, "boxes": boxes}
    target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if "masks" in target:
        masks = target["masks"]
        placed = torch.zeros((len(masks), side, side), dtype=masks.dtype, device=image.device)
        if len(masks):  # interpolate refuses an image's empty stack
            masks = torch.nn.functional.interpolate(masks[None].float(), size=size, mode="nearest")[0]
            placed[:, : kept.shape[1], : kept.shape[2]] = masks[:, top : top + side, left : left + side]
        target["masks"] = placed
    return canvas, {key: value[keep] if key != "image_id" else value for key, value in target.items()}


class Augment:
    """What a run's --augment and --color-jitter do to each batch: `before_step` may change the images, their
    targets and the short side the model's `transform` resizes to; `after_step` puts the transform back for
    evaluation."""

    def __init__(self, preset, color_jitter, seed, min_size):
        self.preset, self.color_jitter, self.seed, self.min_size = preset, color_jitter, seed, min_size
        self.sizes = multiscale_sizes(min_size)

    def before_step(self, transform, images, targets, epoch, batch):
        """(images, targets) of the batch as this step trains on them."""
        if self.preset == "multiscale":
            transform.min_size = (short_side(self.seed, epoch, batch, self.sizes),)
        if self.preset == "lsj":
            placements = jitter_placements(self.seed, epoch, batch, len(images))
            pairs = [large_scale_jitter(image, target, self.min_size, *placement)
                     for image, target, placement in zip(images, targets, placements)]  # fmt: skip
            images, targets = [image for image, _ in pairs], [target for _, target in pairs]
        if self.color_jitter:
            images = jittered(images, jitter_factors(self.seed, epoch, batch, len(images)))
        return images, targets

    def after_step(self, transform):
        transform.min_size = (self.min_size,)

    @property
    def active(self):
        return self.preset != AUGMENTS[0] or self.color_jitter
