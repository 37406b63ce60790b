"""The size the model resizes an image to, and the few fixed shapes a batch is padded to, so that shape-keyed
work (cuDNN's choice of kernels, a compiled graph) is done once per shape rather than once per batch: a ladder
of side lengths from the resize's short side to its long side, and the padding onto a canvas from it.
"""

import math

COMPILED_CANVAS_STEP = 64
CANVAS_LEVELS = 4  # side lengths per axis that batches are padded to, where shapes should be few


def canvas_ladder(min_size, max_size, levels=CANVAS_LEVELS, step=COMPILED_CANVAS_STEP):
    """The side lengths a compiled model pads its batches to: `levels` multiples of `step`, min_size's to max_size's.

    The resize puts every short side at min_size (less only where max_size binds) and every long side at
    most at max_size, so a batch padded to the ladder has one of at most levels**2 shapes, in practice
    about one per orientation and level. Each shape is a graph to compile: padding to multiples of 64
    alone gave 20 at the tutorial's 800/1333 on Penn-Fudan, where the ladder gives 832, 1024, 1216, 1344.
    """
    low, high = _round_up(min_size, step), _round_up(max_size, step)
    return tuple(sorted({_round_up(low + (high - low) * k / max(levels - 1, 1), step) for k in range(levels)}))


def canvas_side(needed, ladder, step=COMPILED_CANVAS_STEP):
    """The shortest rung of the ladder that holds `needed` pixels; past the top, the next multiple of `step`."""
    return next((side for side in ladder if side >= needed), _round_up(needed, step))


def pad_to_canvas(images, ladder):
    """Images of one batch (C x H x W each), zero-padded at the bottom and right into one canvas from the ladder."""
    height = canvas_side(max(image.shape[-2] for image in images), ladder)
    width = canvas_side(max(image.shape[-1] for image in images), ladder)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for image, canvas in zip(images, batch):
        canvas[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


def _round_up(length, step):
    return int(math.ceil(length / step) * step)


def resized(height, width, min_size, max_size):
    """(height, width) an image of that size has after the model's resize, as torchvision works it out: the
    short side to min_size unless that takes the long side past max_size, each side rounded down."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def too_thin(height, width, min_size, max_size):
    """One line saying why the model cannot take an image of this size (a side resized to nothing), or None."""
    new_height, new_width = resized(height, width, min_size, max_size)
    if min(new_height, new_width) >= 1:
        return None
    return (f"{width} x {height} px is too thin for sizes {min_size}/{max_size}: it would be resized to "
            f"{new_width} x {new_height}")  # fmt: skip
