"""A training model's backbone replayed as CUDA graphs, one per input shape, captured with
torch.cuda.make_graphed_callables the first time a shape comes (a canvas, at a batch size).

A step of a small batch is bound by the host launching kernels, not by the GPU running them; a graph
launches the backbone's forward and backward kernels in one call each. Unlike dynamo's cudagraphs backend
nothing is traced: the eager backbone runs three warm-up passes and is recorded. Those passes move a live
BatchNorm's running statistics, so the backbone's buffers are put back after each capture. Evaluation, a
CPU, or anything without gradients runs the backbone eagerly.
"""

from collections import OrderedDict

import torch
from torch import nn

WARMUP = 3  # passes before recording, make_graphed_callables' default: cuDNN and the allocator settle


class _Tuple(nn.Module):
    """The backbone with its feature maps returned as a tuple, what make_graphed_callables records."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        features = self.backbone(images)
        return tuple(features.values()) if isinstance(features, dict) else (features,)


class BackboneGraphs:
    """Calls `backbone` through a CUDA graph of its forward and backward for each input shape met in training."""

    def __init__(self, backbone):
        self.backbone, self.graphs, self.names = backbone, {}, None

    def __call__(self, images):
        if not (images.is_cuda and self.backbone.training and torch.is_grad_enabled()):
            return self.backbone(images)
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(images.shape), images.dtype, images.is_contiguous(memory_format=torch.channels_last), amp)
        # make_graphed_callables refuses autocast's cache of cast weights; a graph keeps its casts anyway.
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False):
            if key not in self.graphs:
                self.graphs[key] = self._capture(images)
            maps = self.graphs[key](images)
        return maps[0] if self.names is None else OrderedDict(zip(self.names, maps))

    def _capture(self, images):
        kept = {name: value.clone() for name, value in self.backbone.state_dict().items()}
        if not self.graphs:
            with torch.no_grad():
                features = self.backbone(images)
            self.names = list(features) if isinstance(features, dict) else None
        graphed = torch.cuda.make_graphed_callables(_Tuple(self.backbone), (images.detach().clone(),), WARMUP)
        with torch.no_grad():
            for name, value in self.backbone.state_dict().items():
                value.copy_(kept[name])  # in place: the graphs read these very tensors
        return graphed
