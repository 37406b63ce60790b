"""The models' layouts, from scratch and from weights; the canvases a compiled model pads its batches to: few
shapes, each holding its batch, coordinates untouched."""

import os
import re
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops.misc import FrozenBatchNorm2d

from lean.canvas import CANVAS_LEVELS, COMPILED_CANVAS_STEP, canvas_ladder, canvas_side, pad_to_canvas
from lean.checkpoint import read_weights
from lean.errors import LeanError
from lean.model import PREDICTORS, ModelSpec, create_model
from lean.speed import RECOMPILE_LIMIT, Speed, tune_for_speed
from lean.weights import WeightsUnavailable

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


RAN = []


def _record_that_it_ran():
    RAN.append(True)
    return {}


class Payload:
    """Pickles as a call of _record_that_it_ran: what a tampered weights file would do, harmlessly."""

    def __reduce__(self):
        return _record_that_it_ran, ()


def test_weights_files_are_read_without_running_what_they_pickle(tmp_path):
    torch.save({"weight": Payload()}, tmp_path / "tampered.pt")
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(LeanError, match=re.escape("tampered.pt: not a loadable weights file (holds more than")) as no:
        read_weights(tmp_path / "tampered.pt")
    assert "weights_only" not in str(no.value)  # torch's advice to load it unsafely is not passed on
    junk = "junk.pt: not a loadable weights file (not a file torch.save writes)"
    with pytest.raises(LeanError, match=re.escape(junk)):
        read_weights(tmp_path / "junk.pt")
    assert RAN == []


def test_a_tampered_file_in_torchs_download_cache_is_refused_not_run(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"weight": Payload()}, cached)  # found there, torch.hub loads it without downloading or hashing it
    spec = ModelSpec("mobilenet_v3_fpn", min_size=128, max_size=224)
    with pytest.raises(WeightsUnavailable, match="ImageNet weights file there holds more than tensors"):
        create_model(spec, download=True)
    assert RAN == [] and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


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


sizes = st.tuples(st.integers(32, 900), st.integers(1, 1400)).map(
    lambda pair: (pair[0], pair[0] + pair[1])
)  # min < max


@given(sizes)
def test_the_ladder_has_at_most_its_levels_each_a_multiple_of_the_step_and_reaches_max_size(min_max):
    ladder = canvas_ladder(*min_max)
    assert 1 <= len(ladder) <= CANVAS_LEVELS
    assert list(ladder) == sorted(set(ladder))
    assert all(side % COMPILED_CANVAS_STEP == 0 for side in ladder)
    assert ladder[0] >= min_max[0] and min_max[1] <= ladder[-1] < min_max[1] + COMPILED_CANVAS_STEP


@given(sizes, st.integers(1, 3000))
def test_a_side_goes_to_the_shortest_rung_that_holds_it(min_max, needed):
    ladder = canvas_ladder(*min_max)
    side = canvas_side(needed, ladder)
    assert side >= needed
    if needed <= ladder[-1]:
        assert side in ladder and all(rung < needed for rung in ladder if rung < side)
    else:  # only a caller that skipped the resize gets here
        assert side % COMPILED_CANVAS_STEP == 0 and side - needed < COMPILED_CANVAS_STEP


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=3))
def test_padding_keeps_every_image_at_the_top_left_and_zeros_the_rest(shapes):
    ladder = canvas_ladder(96, 160)
    images = [torch.randint(1, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes]
    batch = pad_to_canvas(images, ladder)
    assert batch.shape[0] == len(images) and batch.shape[2] == canvas_side(max(h for h, _ in shapes), ladder)
    for image, canvas in zip(images, batch):
        h, w = image.shape[1:]
        assert torch.equal(canvas[:, :h, :w], image)
        assert int(canvas.sum()) == int(image.sum())  # nothing but zeros outside


def test_penn_fudan_sized_batches_meet_few_shapes_at_the_tutorials_sizes():
    # Penn-Fudan's images are 300-1100 pixels a side, most wider than tall; pairs as the loader groups them.
    generator = torch.Generator().manual_seed(0)
    heights = torch.randint(300, 600, (200,), generator=generator)
    widths = (heights * (0.6 + 1.2 * torch.rand(200, generator=generator))).long()
    model = create_model(ModelSpec("mobilenet_v3_fpn", pretrained=False))
    model = tune_for_speed(model, Speed(compile="inductor", canvases=True))  # compiles lazily: the transform runs eager
    assert model.transform.canvas_ladder == canvas_ladder(800, 1333)
    assert 2 * len(model.transform.canvas_ladder) ** 2 <= RECOMPILE_LIMIT  # what the entry points set
    model.eval()
    shapes = set()
    for h, w in zip(heights.tolist(), widths.tolist()):
        images, _ = model.transform([torch.zeros(3, h, w, dtype=torch.uint8)] * 2)
        shapes.add(tuple(images.tensors.shape))
        assert images.image_sizes[0] == images.image_sizes[1]  # the sizes predictions are mapped back with
        assert all(s <= c for s, c in zip(images.image_sizes[0], images.tensors.shape[-2:]))
    assert len(shapes) <= 2 * CANVAS_LEVELS


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_leans_five_losses_are_torchvisions_given_the_same_weights_batch_and_seed(device, monkeypatch):
    """lean's model (uint8 transform, SparseRoIAlign or its by-level CUDA path, folded norms, and on CUDA its
    speed settings but bf16 and canvases) against torchvision's as the tutorial builds it."""
    from bench.seed_pipeline import seed_model
    from lean.cache import Cache, build
    from lean.loader import Loader
    from lean.synthetic import SyntheticSource

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
    with tempfile.TemporaryDirectory() as scratch:
        cache = Cache(build(SyntheticSource(4, seed=3), f"{scratch}/c.h5", workers=0, progress=False))
        images, targets = next(iter(Loader(cache, 2, shuffle=False, device=device, train=True, dtype=torch.uint8)))
    for _ in range(2):  # the second pass: graphs replayed, not recorded
        torch.manual_seed(1)  # the samplers draw from it: both models draw the same regions
        got = model(images, targets)
    torch.manual_seed(1)
    want = reference([image.float() / 255 for image in images], targets)
    assert set(got) == set(want) and len(want) == 5
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-3, atol=1e-3, msg=name)
