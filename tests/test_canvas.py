"""Canvases: the few shapes batches are padded to."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lean.canvas import CANVAS_LEVELS, COMPILED_CANVAS_STEP, canvas_ladder, canvas_side, pad_to_canvas
from lean.model import ModelSpec, create_model
from lean.speed import RECOMPILE_LIMIT, Speed, tune_for_speed

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


def test_fewer_canvas_levels_give_a_shorter_ladder_from_the_same_ends():
    model = tune_for_speed(
        create_model(ModelSpec("mobilenet_v3_fpn", pretrained=False)), Speed(canvases=True, canvas_levels=2)
    )
    assert model.transform.canvas_ladder == canvas_ladder(800, 1333, levels=2) == (832, 1344)
