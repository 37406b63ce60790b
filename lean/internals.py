"""The private torch and torchvision names lean relies on, in one place.

Each may move or vanish in a release; tests/test_internals.py fails first when one does.
"""

import torch
from torch import _foreach_copy_ as foreach_copy_
from torch import _foreach_lerp_ as foreach_lerp_
from torch._dynamo import config as dynamo_config
from torch._dynamo.utils import compilation_time_metrics, counters
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm  # every BatchNorm with running statistics
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor as resnet_fpn_extractor
from torchvision.models.detection.transform import _resize_image_and_masks as resize_image_and_masks
from torchvision.ops.poolers import _convert_to_roi_format as rois_in_roi_format
from torchvision.ops.poolers import _filter_input as feature_maps_named
from torchvision.ops.poolers import _setup_scales as pyramid_scales

__all__ = [
    "BatchNorm",
    "IntermediateLayerGetter",
    "compile_seconds",
    "cpu_computes_in_bf16",
    "feature_maps_named",
    "foreach_copy_",
    "foreach_lerp_",
    "graphs_compiled",
    "overwrite_eps",
    "pyramid_scales",
    "resize_image_and_masks",
    "resnet_fpn_extractor",
    "rois_in_roi_format",
    "set_recompile_limit",
]


def cpu_computes_in_bf16():
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX) rather than emulating it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def set_recompile_limit(limit):
    """Let dynamo keep up to `limit` graphs of one function (one per input shape) before it falls back to eager."""
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)


def graphs_compiled():
    return counters["stats"]["unique_graphs"]


def compile_seconds():
    """Seconds spent compiling so far: dynamo's graphs with their forward code, and the backward code,
    compiled when a graph's first backward runs."""
    phases = ("_compile.compile_inner", "backward._backward_impl")
    return sum(sum(compilation_time_metrics.get(phase, ())) for phase in phases)
