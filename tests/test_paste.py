"""Batched pasting against torchvision's paste_masks_in_image: the same pixels, at the image's edges too."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image

from lean.paste import paste_masks


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(0, 6),
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    size=st.sampled_from([4, 14, 28]),
)
def test_every_pasted_pixel_is_torchvisions(seed, count, height, width, size):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(count, 1, size, size, generator=generator)
    # As the detector gives them: clipped to the image, at least 0.01 a side; expanded, they pass its edges.
    image = torch.tensor([width, height], dtype=torch.float32)
    corners = torch.rand(count, 2, generator=generator) * image
    sides = torch.rand(count, 2, generator=generator) * image + 0.01
    boxes = torch.cat([corners, torch.minimum(corners + sides, image.expand(count, 2))], 1)
    got = paste_masks(masks, boxes, height, width)
    want = paste_masks_in_image(masks, boxes, (height, width))
    assert got.shape == want.shape
    # The same arithmetic, up to the fused multiply-adds a compiler may choose: a few units in the last place.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    decided = (want - 0.5).abs() > 1e-5  # every pixel but those within that of the threshold
    assert torch.equal((got > 0.5)[decided], (want > 0.5)[decided])


def test_the_models_postprocessing_gives_torchvisions_boxes_and_masks():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from lean.transform import Uint8Transform

    transform = Uint8Transform(320, 512, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(7, 2, generator=generator) * 200
    result = {
        "boxes": torch.cat([corners, corners + torch.rand(7, 2, generator=generator) * 100], 1),
        "scores": torch.rand(7, generator=generator),
        "labels": torch.ones(7, dtype=torch.int64),
        "masks": torch.rand(7, 1, 28, 28, generator=generator),
    }
    sizes, originals = [(320, 427)], [(375, 500)]
    got = transform.postprocess([dict(result)], sizes, originals)[0]
    want = GeneralizedRCNNTransform.postprocess(transform, [dict(result)], sizes, originals)[0]
    assert torch.equal(got["boxes"], want["boxes"])
    assert torch.equal(got["masks"] > 0.5, want["masks"] > 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_every_pasted_pixel_is_torchvisions():
    generator = torch.Generator().manual_seed(0)
    image = torch.tensor([1216.0, 800.0])
    corners = torch.rand(100, 2, generator=generator) * image
    boxes = torch.cat([corners, torch.minimum(corners + torch.rand(100, 2, generator=generator) * 300, image)], 1)
    masks = torch.rand(100, 1, 28, 28, generator=generator)
    got = paste_masks(masks.cuda(), boxes.cuda(), 800, 1216).cpu()
    want = paste_masks_in_image(masks.cuda(), boxes.cuda(), (800, 1216)).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    decided = (want - 0.5).abs() > 1e-5
    assert torch.equal((got > 0.5)[decided], (want > 0.5)[decided])
