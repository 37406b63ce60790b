"""Augmentation: pure functions of (seed, epoch, batch), images changed with their boxes and masks."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lean.augment import Augment, jitter_factors, jittered, multiscale_sizes, short_side
from lean.loader import Loader
from lean.model import ModelSpec, create_model
from tests.conftest import QUICK, run_train


def within(mask, box, slack=1):
    """Whether the mask's pixels lie in its box: pixel c spans [c, c + 1), and a mask resized by nearest neighbour
    may reach one pixel (`slack`) past the box scaled exactly."""
    rows, cols = np.nonzero(mask.numpy())
    x0, y0, x1, y1 = box.tolist()
    return not len(rows) or (cols.min() >= x0 - 1 - slack and cols.max() <= x1 + slack
                             and rows.min() >= y0 - 1 - slack and rows.max() <= y1 + slack)  # fmt: skip


def test_multiscale_draws_the_references_sides_scaled_to_the_runs_min_size():
    assert multiscale_sizes(800) == list(range(480, 801, 32))
    assert multiscale_sizes(128) == sorted({round(side * 128 / 800) for side in range(480, 801, 32)})
    sides = {short_side(0, 0, batch, multiscale_sizes(800)) for batch in range(50)}
    assert sides <= set(multiscale_sizes(800)) and len(sides) > 3
    assert short_side(3, 1, 7, multiscale_sizes(800)) == short_side(3, 1, 7, multiscale_sizes(800))


@given(st.integers(0, 20), st.integers(0, 5), st.integers(0, 30))
def test_colour_jitter_is_a_pure_function_of_seed_epoch_and_batch(seed, epoch, batch):
    factors = jitter_factors(seed, epoch, batch, 3)
    assert factors == jitter_factors(seed, epoch, batch, 3) and factors != jitter_factors(seed, epoch, batch + 1, 3)
    assert all(0.875 <= b <= 1.125 and 0.5 <= c <= 1.5 and 0.5 <= s <= 1.5 and -0.05 <= h <= 0.05
               for b, c, s, h in factors)  # fmt: skip


def test_colour_jitter_keeps_uint8_images_and_does_nothing_at_its_neutral_factors():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    (same,) = jittered([image], [(1.0, 1.0, 1.0, 0.0)])
    assert same.dtype == torch.uint8 and (same.int() - image.int()).abs().max() <= 1
    (changed,) = jittered([image], [(1.1, 1.4, 0.6, 0.04)])
    assert changed.shape == image.shape and (changed.int() - image.int()).abs().float().mean() > 2


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000))
def test_a_multiscale_batch_is_resized_with_its_boxes_and_masks_and_the_size_comes_back(cache, batch):
    model = create_model(ModelSpec("mobilenet_v3_fpn", min_size=96, max_size=160, pretrained=False)).train()
    augment = Augment("multiscale", True, seed=0, min_size=96)
    images, targets = next(iter(Loader(cache, 2, seed=0, device="cpu", dtype=torch.uint8, indices=[3, 4])))
    images, targets = augment.before_step(model.transform, images, targets, epoch=0, batch=batch)
    side = model.transform.min_size[0]
    resized, targets = model.transform(images, [dict(t) for t in targets])
    for (height, width), target in zip(resized.image_sizes, targets):
        assert min(height, width) == side or max(height, width) == 160  # the short side drawn, unless too long
        assert target["masks"].shape[-2:] == (height, width)
        assert all(within(mask, box) for box, mask in zip(target["boxes"], target["masks"]))
        assert (target["boxes"][:, 2] <= width + 1e-3).all() and (target["boxes"][:, 3] <= height + 1e-3).all()
    augment.after_step(model.transform)
    assert model.transform.min_size == (96,)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 3))
def test_large_scale_jitter_fills_the_square_and_keeps_each_mask_in_its_clipped_box(cache, batch, epoch):
    augment = Augment("lsj", False, seed=1, min_size=64)
    images, targets = next(iter(Loader(cache, 3, seed=0, device="cpu", dtype=torch.uint8, indices=[0, 5, 9])))
    before = [len(target["boxes"]) for target in targets]
    images, targets = augment.before_step(None, images, [dict(t) for t in targets], epoch, batch)
    again, _ = augment.before_step(None, *next(iter(Loader(cache, 3, seed=0, device="cpu", dtype=torch.uint8,
                                                             indices=[0, 5, 9]))), epoch, batch)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(images, again))  # a pure function of (seed, epoch, batch)
    for image, target, count in zip(images, targets, before):
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        boxes, masks = target["boxes"], target["masks"]
        assert len(boxes) == len(masks) == len(target["labels"]) == len(target["area"]) <= count
        assert (boxes >= 0).all() and (boxes <= 64).all()  # clipped to the square
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()  # none left without area
        assert masks.shape[-2:] == (64, 64)
        assert all(within(mask, box) for box, mask in zip(boxes, masks))


def test_a_run_trains_with_large_scale_jitter_and_colour_jitter(tiny, tmp_path, capsys):
    argv = ["--cache", str(tiny), *QUICK, "--augment", "lsj", "--color-jitter", "--max-iters", "2"]
    status, _, stderr = run_train([*argv, "--out", str(tmp_path)], capsys)
    assert status == 0, stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["config"]["augment"] == "lsj"
