"""SparseRoIAlign against torchvision's RoIAlign: the same pooled values and the same gradients, on any regions."""

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import MultiScaleRoIAlign, roi_align

from lean.heads import torchvision_heads
from lean.model import ModelSpec, create_model
from lean.roi_align import SparseRoIAlign, pyramid_roi_align, roi_align_by_level


@st.composite
def pyramids(draw):
    """Feature maps at strides 4, 8, ... of 1-2 images, and 0-12 regions per image, some past the borders."""
    height, width = 32 * draw(st.integers(1, 3)), 32 * draw(st.integers(1, 3))
    images, channels, levels = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    features = OrderedDict(
        (str(k), torch.randn(images, channels, height // 4 >> k, width // 4 >> k, generator=generator))
        for k in range(levels)
    )
    boxes = []
    for _ in range(images):
        count = draw(st.integers(0, 12))
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width + 16.0, height + 16.0]) - 8
        size = torch.rand(count, 2, generator=generator) * torch.tensor([float(width), float(height)])
        size[: count // 4] = 0  # degenerate regions too
        boxes.append(torch.cat([corner, corner + size], 1))
    output_size = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return features, boxes, [(height, width)] * images, output_size, draw(st.integers(1, 3))


def pooled_with_gradients(pool, features, boxes, image_shapes):
    leaves = OrderedDict((name, f.clone().requires_grad_()) for name, f in features.items())
    pooled = pool(leaves, boxes, image_shapes)
    upstream = torch.linspace(-1, 1, pooled.numel()).reshape(pooled.shape)  # every output weighted differently
    (pooled * upstream).sum().backward()
    return pooled, [leaf.grad for leaf in leaves.values()]


@pytest.mark.parametrize("pool_by", [pyramid_roi_align, roi_align_by_level], ids=["cpu_sparse", "cuda_by_level"])
@settings(max_examples=50, deadline=None)
@given(case=pyramids())
def test_pooling_and_its_gradient_equal_torchvisions(pool_by, case):
    features, boxes, image_shapes, output_size, sampling_ratio = case
    names = list(features)
    want, want_grads = pooled_with_gradients(
        MultiScaleRoIAlign(names, output_size, sampling_ratio), features, boxes, image_shapes
    )
    with pytest.MonkeyPatch.context() as patch:  # either path, run on the CPU
        patch.setattr("lean.roi_align.pyramid_roi_align", pool_by)
        got, got_grads = pooled_with_gradients(
            SparseRoIAlign(names, output_size, sampling_ratio), features, boxes, image_shapes
        )
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(pyramids())
def test_aligned_pooling_equals_torchvisions(case):
    features, boxes, _, output_size, sampling_ratio = case
    level = next(iter(features.values()))
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    want = roi_align(level, rois, output_size, 0.25, sampling_ratio, aligned=True)
    got = pyramid_roi_align(
        [level], rois, torch.zeros(len(rois), dtype=torch.int64), [0.25], output_size, sampling_ratio, aligned=True
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_last_maps_and_bf16_come_back_in_their_dtype():
    features = OrderedDict([("0", torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last))])
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0], [0.0, 0.0, 63.0, 63.0]])]
    want = MultiScaleRoIAlign(["0"], 7, 2)(features, boxes, [(64, 64)])
    pool = SparseRoIAlign(["0"], 7, 2)
    torch.testing.assert_close(pool(features, boxes, [(64, 64)]), want, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = pool(OrderedDict([("0", features["0"].bfloat16())]), boxes, [(64, 64)])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, rtol=0.05, atol=0.05)


def test_adaptive_sampling_is_left_to_torchvision():
    features = OrderedDict([("0", torch.randn(1, 2, 16, 16))])
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0]])]
    torch.testing.assert_close(
        SparseRoIAlign(["0"], 5, 0)(features, boxes, [(64, 64)]),
        MultiScaleRoIAlign(["0"], 5, 0)(features, boxes, [(64, 64)]),
    )


@pytest.mark.parametrize("backbone", ["mobilenet_v3_fpn", "mobilenet_v2"])
def test_models_pool_with_it_and_their_losses_are_torchvisions(backbone):
    torch.manual_seed(0)
    model = create_model(ModelSpec(backbone, min_size=96, max_size=160, pretrained=False)).train()
    heads = model.roi_heads
    assert isinstance(heads.box_roi_pool, SparseRoIAlign) and isinstance(heads.mask_roi_pool, SparseRoIAlign)
    images = [torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 110.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 120, 160, dtype=torch.uint8).index_fill_(1, torch.arange(20, 110), 1),
        }
        for _ in images
    ]
    torch.manual_seed(1)  # the samplers draw from it: both passes draw the same regions
    got = model(images, targets)
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(heads, name)
        setattr(heads, name, MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio))
    torchvision_heads(model)
    torch.manual_seed(1)
    want = model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
