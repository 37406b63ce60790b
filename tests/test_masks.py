"""Masks stored one by one: any masks, overlapping or empty, come back bit for bit, mirrored or not, from the
numpy decoder and from the loader's torch one alike."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lean import masks as mask_codec
from lean.staging import paste_masks


@st.composite
def mask_stacks(draw):
    """N x H x W uint8 masks, free to overlap: scattered pixels, rectangles, or nothing at all."""
    height, width, count = draw(st.integers(1, 30)), draw(st.integers(1, 30)), draw(st.integers(0, 6))
    if draw(st.booleans()):
        return draw(arrays(np.uint8, (count, height, width), elements=st.integers(0, 1)))
    masks = np.zeros((count, height, width), np.uint8)
    for mask in masks:
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        y1, x1 = draw(st.integers(y0, height)), draw(st.integers(x0, width))
        mask[y0:y1, x0:x1] = 1
    return masks


@given(mask_stacks(), st.booleans())
def test_masks_come_back_bit_for_bit_mirrored_or_not(masks, flip):
    crops, bits, offsets = mask_codec.encode(masks)
    height, width = masks.shape[1:]
    decoded = mask_codec.decode(crops, bits, offsets, height, width, flip=flip)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, masks[:, :, ::-1] if flip else masks)


@given(mask_stacks())
def test_crops_are_the_smallest_boxes_holding_each_mask(masks):
    for mask, (y, x, h, w) in zip(masks, mask_codec.crop_boxes(masks)):
        assert mask[y : y + h, x : x + w].sum() == mask.sum()
        if mask.any():
            crop = mask[y : y + h, x : x + w]
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        else:
            assert h == w == 0


@given(mask_stacks(), st.booleans())
def test_the_loaders_torch_decoder_equals_the_numpy_one(masks, flip):
    crops, bits, offsets = mask_codec.encode(masks)
    height, width = masks.shape[1:]
    pasted = paste_masks(torch.from_numpy(bits), crops.tolist(), offsets.tolist(), height, width, flip)
    assert np.array_equal(pasted.numpy(), mask_codec.decode(crops, bits, offsets, height, width, flip=flip))


@given(mask_stacks())
def test_flipped_crops_are_the_crops_of_the_flipped_masks(masks):
    width = masks.shape[2]
    assert np.array_equal(
        mask_codec.flip_crops(mask_codec.crop_boxes(masks), width), mask_codec.crop_boxes(masks[:, :, ::-1])
    )
