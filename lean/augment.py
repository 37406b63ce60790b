"""Augmentation on the batch as training takes it (lean.train --augment, --color-jitter): pure functions of
(seed, epoch, batch), so that a resumed run draws what the uninterrupted one drew.

    hflip        the tutorial's: each image flipped left-right with p = 0.5 (the loader does it, with
                 its boxes and masks)
    multiscale   hflip, and each batch's short side drawn from the references' preset, 480 to 800 in
                 steps of 32, scaled to the run's --min-size (the model's transform resizes the images,
                 boxes and masks to it)
    color jitter brightness, contrast, saturation and hue of each image changed as the references' SSD
                 preset does (RandomPhotometricDistort's ranges); boxes and masks are untouched

Both work on the batch where it is, on the device for a GPU run, and decode nothing again.
"""

import numpy as np
from torchvision.transforms.v2 import functional as F

from lean.config import AUGMENTS

BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.875, 1.125), (0.5, 1.5), (0.5, 1.5), (-0.05, 0.05)


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


class Augment:
    """What a run's --augment and --color-jitter do to each batch: `before_step` may change the images and the
    short side the model's `transform` resizes to; `after_step` puts the transform back for evaluation."""

    def __init__(self, preset, color_jitter, seed, min_size):
        self.preset, self.color_jitter, self.seed, self.min_size = preset, color_jitter, seed, min_size
        self.sizes = multiscale_sizes(min_size)

    def before_step(self, transform, images, epoch, batch):
        if self.preset == "multiscale":
            transform.min_size = (short_side(self.seed, epoch, batch, self.sizes),)
        if self.color_jitter:
            images = jittered(images, jitter_factors(self.seed, epoch, batch, len(images)))
        return images

    def after_step(self, transform):
        transform.min_size = (self.min_size,)

    @property
    def active(self):
        return self.preset != AUGMENTS[0] or self.color_jitter
