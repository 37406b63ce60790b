"""Frozen BatchNorm folded into its convolution: the same function and gradients, the same state dict."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from lean.frozen_norm import AppliedByConv, ConvWithFrozenNorm, fold_frozen_norms
from lean.model import _BUILDERS, ModelSpec, create_model


def frozen_backbone(seed, eps=1e-5, name="resnet18"):
    """A pretrained-layout FPN backbone in float64 with random frozen statistics (the defaults are an identity)."""
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(
        backbone_name=name, weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    ).double()
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return backbone


def outputs_and_gradients(model, images):
    model.zero_grad()
    features = model(images)
    sum(
        (value * torch.linspace(-1, 1, value.numel(), dtype=value.dtype).view_as(value)).sum()
        for value in features.values()
    ).backward()
    return features, {
        name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None
    }


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([0.0, 1e-5]), st.booleans())
def test_a_folded_backbone_computes_the_same_function_and_gradients(seed, eps, channels_last):
    reference = frozen_backbone(seed, eps)
    folded = copy.deepcopy(reference)
    assert fold_frozen_norms(folded) == 20  # ResNet-18: the stem, 16 in the blocks, 3 in the downsamples
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected, expected_grads = outputs_and_gradients(reference, images)
    got, got_grads = outputs_and_gradients(folded, images)
    assert expected.keys() == got.keys() and all(
        torch.allclose(expected[k], got[k], rtol=1e-9, atol=1e-9) for k in expected
    )
    assert expected_grads.keys() == got_grads.keys() and len(got_grads) > 0
    assert all(torch.allclose(expected_grads[k], got_grads[k], rtol=1e-9, atol=1e-9) for k in expected_grads)
    assert not any(
        name.startswith(("body.conv1.", "body.layer1.")) for name in got_grads
    )  # the frozen stages stay frozen


def test_folding_keeps_the_state_dict_and_follows_weights_loaded_later():
    reference, other = frozen_backbone(0), frozen_backbone(1)
    folded = copy.deepcopy(reference)
    fold_frozen_norms(folded)
    state = folded.state_dict()
    assert list(state) == list(reference.state_dict()) and all(
        torch.equal(state[k], v) for k, v in reference.state_dict().items()
    )
    folded.load_state_dict(other.state_dict())  # as a resumed run does, after the model is built
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert all(
        torch.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(other(images).values(), folded(images).values())
    )


def test_folding_twice_folds_nothing_more():
    model = frozen_backbone(0)
    assert fold_frozen_norms(model) == 20 and fold_frozen_norms(model) == 0


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "mobilenet_v3_fpn", "resnet18_fpn"])
def test_lean_models_fold_every_frozen_norm_of_the_pretrained_layout(backbone):
    torch.manual_seed(0)
    scratch = create_model(ModelSpec(backbone, min_size=96, max_size=160, pretrained=False))
    assert not any(isinstance(module, (FrozenBatchNorm2d, ConvWithFrozenNorm)) for module in scratch.modules())
    pretrained_weights = _BUILDERS[backbone](2, True, False, 96, 160).state_dict()  # the layout, random values
    model = create_model(ModelSpec(backbone, min_size=96, max_size=160), pretrained_weights)
    norms = [module for module in model.modules() if isinstance(module, FrozenBatchNorm2d)]
    assert norms and all(type(module) is AppliedByConv for module in norms)
    assert sum(isinstance(module, ConvWithFrozenNorm) for module in model.modules()) == len(norms)


def test_a_folded_norms_scale_follows_its_buffers_when_they_change():
    conv, norm = torch.nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4)
    folded = ConvWithFrozenNorm.fold(conv, norm)
    x = torch.randn(1, 3, 8, 8)
    first = folded(x)
    norm.load_state_dict({**norm.state_dict(), "running_var": torch.full((4,), 4.0)})  # in place, as a load is
    torch.testing.assert_close(folded(x), norm(conv(x)))
    assert not torch.allclose(folded(x), first)
    with torch.inference_mode():
        folded(x)
    folded(x).sum().backward()  # nothing made in inference mode was kept for autograd
