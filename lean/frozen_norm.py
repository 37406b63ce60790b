"""Frozen BatchNorm folded into the convolution before it: the same function in one pass, not three.

A pretrained detection backbone's BatchNorm is frozen: a fixed per-channel scale and shift. torchvision
applies it as its own step, a multiply and an add over every activation (and, under autocast, in
float32, so bf16 activations go out and back at twice their size). Folded, the convolution takes the
scale into its weight and the shift as its bias (a pass over the weights, which are far smaller than the
activations), the scale and shift worked out from the norm's buffers again whenever those change, so
gradients, checkpoints and loading are as before: the state dict's keys and values are unchanged. What it saves is in
docs/performance.md.
"""

import itertools

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from lean.internals import IntermediateLayerGetter


class AppliedByConv(FrozenBatchNorm2d):
    """A frozen BatchNorm whose convolution applies it: it passes its input through, and keeps its buffers
    where the state dict has them."""

    def forward(self, x):
        return x


class ConvWithFrozenNorm(nn.Conv2d):
    """A convolution followed by a frozen BatchNorm, computed as one convolution."""

    @classmethod
    def fold(cls, conv, norm):
        """A module computing norm(conv(x)), holding conv's own parameters (the same tensors)."""
        folded = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        folded.weight, folded.bias = conv.weight, conv.bias
        folded.norm = (norm,)  # in a tuple, not a submodule: its buffers stay under the norm's own name
        return folded.train(conv.training)

    def forward(self, x):
        scale, shift = self.scale_and_shift()
        if self.bias is not None:
            shift = shift + self.bias * scale.flatten()
        return self._conv_forward(x, self.weight * scale, shift)

    def scale_and_shift(self):
        """The norm's per-channel scale (C x 1 x 1 x 1) and shift, worked out again only when its buffers change
        (a load writes them in place, a move puts them elsewhere): four kernels a convolution fewer a step."""
        norm = self.norm[0]
        buffers = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
        uncached = torch.compiler.is_compiling() or torch.is_inference_mode_enabled()  # a trace; tensors not to keep
        key = None if uncached else tuple((t.data_ptr(), t._version) for t in buffers)
        if key is None or key != getattr(self, "_folded_for", None):
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            self._folded = scale.reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * scale
            self._folded_for = key
        return self._folded


def fold_frozen_norms(model):
    """Fold each frozen BatchNorm that takes a convolution's output straight into that convolution, in place.

    Returns the number folded. Looks only where the data flow is known: sequential containers (a
    convolution and the norm registered after it) and ResNet blocks (conv{k} into bn{k}).
    """
    folded = 0
    for parent in list(model.modules()):
        for conv_name, norm_name in _conv_then_norm(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if type(conv) is nn.Conv2d and type(norm) is FrozenBatchNorm2d:
                applied = AppliedByConv(norm.weight.numel(), norm.eps).train(norm.training)
                for name, buffer in norm.named_buffers():
                    setattr(applied, name, buffer)  # the same tensors
                setattr(parent, norm_name, applied)
                setattr(parent, conv_name, ConvWithFrozenNorm.fold(conv, applied))
                folded += 1
    return folded


def _conv_then_norm(parent):
    """Names (conv, norm) of children of `parent` where the norm is applied to the conv's output."""
    if isinstance(parent, (Bottleneck, BasicBlock)):
        return [(f"conv{k}", f"bn{k}") for k in (1, 2, 3) if hasattr(parent, f"bn{k}")]
    if isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):  # each child takes the one before's output
        names = list(parent._modules)
        return list(itertools.pairwise(names))
    return []
