"""The models' layouts, from scratch and from weights, and their losses against torchvision's."""

import tempfile

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from lean.checkpoint import read_weights
from lean.errors import LeanError
from lean.model import PREDICTORS, ModelSpec, create_model
from lean.speed import Speed, tune_for_speed

SCRATCH = ModelSpec("resnet50_fpn", min_size=320, max_size=512, pretrained=False)


PRETRAINED = ModelSpec("resnet50_fpn", min_size=320, max_size=512)


def test_weights_from_a_file_get_the_layout_of_downloaded_ones(tmp_path):
    torch.manual_seed(0)
    scratch = create_model(SCRATCH)
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in scratch.modules())
    assert all(parameter.requires_grad for parameter in scratch.parameters())
    torch.save(scratch.state_dict(), tmp_path / "weights.pt")

    state, pretrained = read_weights(tmp_path / "weights.pt")
    model = create_model(ModelSpec("resnet50_fpn", min_size=320, max_size=512, pretrained=pretrained), state)
    trunk = model.backbone.body
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert sum(isinstance(module, FrozenBatchNorm2d) for module in trunk.modules()) == 53  # ResNet-50's every norm
    assert trunk.bn1.eps == 0.0  # as torchvision gives the COCO weights
    assert not any(parameter.requires_grad for parameter in [*trunk.conv1.parameters(), *trunk.layer1.parameters()])
    assert all(parameter.requires_grad for parameter in [*trunk.layer2.parameters(), *model.roi_heads.parameters()])
    saved = scratch.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_weights_for_another_number_of_classes_keep_all_but_their_predictors(capsys):
    torch.manual_seed(0)
    coco_like = create_model(
        ModelSpec("resnet50_fpn", tuple(map(str, range(90))), 320, 512, False)
    ).state_dict()  # the COCO weights' shapes
    model = create_model(PRETRAINED, coco_like)
    state = model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 2
    assert not torch.equal(
        state["roi_heads.mask_predictor.conv5_mask.weight"], coco_like["roi_heads.mask_predictor.conv5_mask.weight"]
    )
    assert all(torch.equal(value, coco_like[key]) for key, value in state.items() if not key.startswith(PREDICTORS))
    assert "predictors are for another number of classes" in capsys.readouterr().err

    assert all(torch.equal(value, state[key]) for key, value in create_model(PRETRAINED, state).state_dict().items())
    del coco_like["backbone.fpn.inner_blocks.0.0.weight"]
    with pytest.raises(LeanError, match="does not fit"):
        create_model(PRETRAINED, coco_like)


def test_a_model_from_a_whole_state_is_built_on_meta_and_fills_every_tensor_from_it():
    spec = ModelSpec("resnet18_fpn", ("a", "b"), 128, 224, pretrained=False)
    torch.manual_seed(0)
    state = {key: value.clone() for key, value in create_model(spec).state_dict().items()}
    before = torch.get_rng_state()
    model = create_model(spec, state).eval()
    assert torch.equal(torch.get_rng_state(), before)  # nothing was initialised only to be overwritten
    tensors = [*model.parameters(), *model.buffers(), *model.rpn.anchor_generator.cell_anchors]
    assert not any(tensor.is_meta for tensor in tensors)
    assert model.backbone.body.conv1.weight.data_ptr() == state["backbone.body.conv1.weight"].data_ptr()
    copied = create_model(spec).eval()
    copied.load_state_dict(state)
    image = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    with torch.no_grad():
        got, want = model([image])[0], copied([image])[0]
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


def _first_batch(device, masks=True):
    """A batch of two synthetic images, as lean.train's Loader makes it (uint8 images)."""
    from lean.cache import Cache, build
    from lean.loader import Loader
    from lean.synthetic import SyntheticSource

    with tempfile.TemporaryDirectory() as scratch:
        cache = Cache(build(SyntheticSource(4, seed=3), f"{scratch}/c.h5", workers=0, progress=False))
        loader = Loader(cache, 2, shuffle=False, device=device, train=True, dtype=torch.uint8, masks=masks)
        return next(iter(loader))


def _assert_torchvisions_losses(got, reference, images, targets, count):
    """`got` equals the losses of torchvision's `reference` model on the batch, drawing regions from seed 1."""
    torch.manual_seed(1)
    want = reference([image.float() / 255 for image in images], targets)
    assert set(got) == set(want) and len(want) == count
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_leans_five_losses_are_torchvisions_given_the_same_weights_batch_and_seed(device, monkeypatch):
    """lean's model (uint8 transform, SparseRoIAlign or its by-level CUDA path, folded norms, and on CUDA its
    speed settings but bf16 and canvases) against torchvision's as the tutorial builds it."""
    from bench.seed_pipeline import seed_model

    device = torch.device(device)
    torch.manual_seed(0)
    reference = seed_model(160, 256).to(device).train()
    spec = ModelSpec("resnet50_fpn", min_size=160, max_size=256)
    model = create_model(spec, reference.state_dict()).to(device)
    if device.type == "cuda":
        # Same layout and full fp32 on both sides: a random model's objectness scores are near ties, and
        # TF32's rounding (of folded weights against torchvision's conv-then-scale) reorders them.
        reference = reference.to(memory_format=torch.channels_last)
        model = tune_for_speed(model, Speed(channels_last=True, compile="cudagraphs"))
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model.train()
    images, targets = _first_batch(device)
    for _ in range(2):  # the second pass: graphs replayed, not recorded
        torch.manual_seed(1)  # the samplers draw from it: both models draw the same regions
        got = model(images, targets)
    _assert_torchvisions_losses(got, reference, images, targets, 5)


@pytest.mark.parametrize("recipe", ["resnet50_fpn", "mobilenet_v2"])
def test_leans_four_detection_losses_are_torchvisions_for_both_faster_rcnn_recipes(recipe):
    """The tutorial's Faster R-CNN (fasterrcnn_resnet50_fpn's fine-tuning layout, and its MobileNetV2 recipe)
    against lean's `detect` model given the same weights, batch and seed; the state dict is the same one."""
    from bench.seed_pipeline import seed_detector, seed_mobilenet_detector

    torch.manual_seed(0)
    reference = {"resnet50_fpn": seed_detector, "mobilenet_v2": seed_mobilenet_detector}[recipe](160, 256).train()
    spec = ModelSpec(recipe, min_size=160, max_size=256, pretrained=recipe == "resnet50_fpn", task="detect")
    model = create_model(spec, reference.state_dict()).train()
    assert set(model.state_dict()) == set(reference.state_dict())  # so lean's weights load into torchvision's model
    if recipe == "resnet50_fpn":
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        torchvision_model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
        torchvision_model.load_state_dict(model.state_dict())
    images, targets = _first_batch("cpu", masks=False)
    assert all("masks" not in target for target in targets)
    torch.manual_seed(1)  # the samplers draw from it: both models draw the same regions
    _assert_torchvisions_losses(model(images, targets), reference, images, targets, 4)


def test_the_v2_model_is_torchvisions_v2_model_given_the_same_weights():
    """resnet50_fpn_v2: lean's state dict loads into torchvision's maskrcnn_resnet50_fpn_v2 with its predictors for
    the cache's classes, and the losses on a batch, from the same seed, are its losses. (The detect model is the
    same builder without the mask branch: its download is tested in test_weights.)"""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet50_fpn_v2", min_size=96, max_size=128, pretrained=False)).train()
    reference = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2, min_size=96, max_size=128)
    reference.load_state_dict(model.state_dict())
    reference.train()
    images, targets = _first_batch("cpu")
    torch.manual_seed(1)
    _assert_torchvisions_losses(model(images, targets), reference, images, targets, 5)
