"""Mask R-CNN's masks pasted into the image, every detection at once: torchvision's paste_masks_in_image, batched.

torchvision pastes one detection at a time, reading its box's corners to the host for each (a sync per
detection on a GPU), and resizes each M x M mask with F.interpolate. Here every detection's box is
expanded and rounded as torchvision does it, and bilinear interpolation's sample rows and columns
(align_corners=False, as F.interpolate computes them) are worked out for the whole image as index and
weight tables, one (detections, height) and one (detections, width): two gathers make every mask at
once, in the interpolation's own arithmetic, zero outside its box's rows and columns.
"""

import torch
import torch.nn.functional as F

PADDING = 1  # torchvision's: one pixel of zeros around each mask before it is resized


def paste_masks(masks, boxes, height, width):
    """masks (D, 1, M, M) in [0, 1], boxes (D, 4) in image pixels -> (D, 1, height, width), as torchvision's
    paste_masks_in_image(masks, boxes, (height, width)) makes them."""
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0], (PADDING,) * 4)
    boxes = expanded(boxes, (size + 2 * PADDING) / size).to(torch.int64)
    rows = _samples(boxes[:, 1], boxes[:, 3], padded.shape[-2], height)
    columns = _samples(boxes[:, 0], boxes[:, 2], padded.shape[-1], width)
    return _interpolate(padded, rows, columns)[:, None]


def expanded(boxes, scale):
    """torchvision's expand_boxes: each box scaled about its centre."""
    x0, y0, x1, y1 = boxes.unbind(1)
    half_w, half_h = (x1 - x0) * 0.5 * scale, (y1 - y0) * 0.5 * scale
    centre_x, centre_y = (x1 + x0) * 0.5, (y1 + y0) * 0.5
    return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), 1)


def _samples(start, end, source, image):
    """For each box's [start, end] (int pixels) along one axis of `image` pixels: the source rows (or columns) of
    the resized mask each image pixel reads, (low, high), their weights (1 - fraction, fraction), and whether
    the pixel lies in the box; each (D, image). The box spans max(end - start + 1, 1) resized pixels."""
    length = (end - start + 1).clamp(min=1)
    pixel = torch.arange(image, device=start.device)
    offset = pixel[None, :] - start[:, None]  # the resized mask's pixel each image pixel shows
    scale = source / length.to(torch.float32)  # F.interpolate's input / output, in float32
    at = (scale[:, None] * (offset.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = at.to(torch.int64).clamp(max=source - 1)
    high = torch.where(low < source - 1, low + 1, low)
    fraction = at - low.to(torch.float32)
    inside = (offset >= 0) & (offset < length[:, None]) & (pixel[None, :] <= end[:, None])
    return low, high, 1 - fraction, fraction, inside


def _interpolate(padded, rows, columns):
    """(D, height, width) of each padded mask (D, S, S) sampled at its rows and columns, zero outside its box."""
    row_low, row_high, row_keep, row_take, row_inside = rows
    column_low, column_high, column_keep, column_take, column_inside = columns
    detections = torch.arange(len(padded), device=padded.device)[:, None, None]
    source_rows = torch.arange(padded.shape[-2], device=padded.device)[None, :, None]
    # Along the columns first, for every source row: D x S x width.
    left = padded[detections, source_rows, column_low[:, None, :]]
    right = padded[detections, source_rows, column_high[:, None, :]]
    across = column_keep[:, None, :] * left + column_take[:, None, :] * right
    # Then along the rows: D x height x width.
    top = across[detections, row_low[:, :, None], torch.arange(across.shape[-1], device=padded.device)]
    bottom = across[detections, row_high[:, :, None], torch.arange(across.shape[-1], device=padded.device)]
    pasted = row_keep[:, :, None] * top + row_take[:, :, None] * bottom
    pasted = torch.where(row_inside[:, :, None] & column_inside[:, None, :], pasted, 0.0)
    return pasted.to(padded.dtype)  # rounded to the masks' dtype, as F.interpolate returns it
