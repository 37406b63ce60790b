"""The private torch and torchvision names lean relies on still exist and still do what lean takes them for."""

import torch
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from lean import internals


def test_every_private_name_still_imports():
    for name in internals.__all__:
        assert callable(getattr(internals, name)), name


def test_dynamo_counters_and_limits_are_readable_and_settable():
    assert internals.graphs_compiled() >= 0 and internals.compile_seconds() >= 0.0
    internals.set_recompile_limit(64)
    assert torch._dynamo.config.recompile_limit >= 64
    assert isinstance(internals.cpu_computes_in_bf16(), bool)


def test_overwrite_eps_reaches_every_frozen_norm():
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d)
    internals.overwrite_eps(backbone, 0.0)
    assert all(module.eps == 0.0 for module in backbone.modules() if isinstance(module, FrozenBatchNorm2d))


def test_the_pooler_helpers_keep_their_signatures():
    pool = MultiScaleRoIAlign(["0", "1"], 7, 2)
    features = {"0": torch.zeros(1, 4, 32, 32), "1": torch.zeros(1, 4, 16, 16), "pool": torch.zeros(1, 4, 8, 8)}
    maps = internals.feature_maps_named(features, pool.featmap_names)
    assert [tuple(m.shape) for m in maps] == [(1, 4, 32, 32), (1, 4, 16, 16)]
    scales, mapper = internals.pyramid_scales(maps, [(128, 128)], pool.canonical_scale, pool.canonical_level)
    assert scales == [0.25, 0.125] and callable(mapper)
    rois = internals.rois_in_roi_format([torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    assert rois.tolist() == [[0.0, 0.0, 0.0, 10.0, 10.0]]


def test_the_image_and_mask_resize_keeps_its_signature():
    image, masks = torch.rand(3, 40, 60), torch.ones(2, 40, 60, dtype=torch.uint8)
    resized, target = internals.resize_image_and_masks(image, 80.0, 1333.0, {"masks": masks}, None)
    assert resized.shape == (3, 80, 120) and target["masks"].shape == (2, 80, 120)
