"""Property tests: the target functions on any instance map, against the tutorial's formulas."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench.seed_pipeline import seed_targets
from lean.targets import (
    TooManyInstances,
    compact_instance_map,
    flip_boxes,
    instance_ids,
    instance_targets,
    is_degenerate,
    masks_of,
    targets,
)
from tests.strategies import instance_maps


@given(instance_maps())
def test_boxes_enclose_and_touch_their_masks(id_map):
    height, width = id_map.shape
    ids = instance_ids(id_map)
    boxes = instance_targets(id_map)["boxes"]
    assert boxes.dtype == np.float32 and boxes.shape == (len(ids), 4)
    for box, mask in zip(boxes, masks_of(id_map, ids)):
        x0, y0, x1, y1 = box.astype(int)
        assert 0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height
        rows, cols = np.nonzero(mask)
        assert rows.min() == y0 and rows.max() == y1  # inside, and each edge touches the mask
        assert cols.min() == x0 and cols.max() == x1


@given(instance_maps())
def test_one_instance_per_distinct_id_in_id_order(id_map):
    expected = sorted(set(id_map.ravel().tolist()) - {0})
    assert instance_ids(id_map).tolist() == expected
    target = instance_targets(id_map)
    assert target["labels"].dtype == np.int64 and target["labels"].tolist() == [1] * len(expected)
    assert target["iscrowd"].dtype == np.int64 and target["iscrowd"].tolist() == [0] * len(expected)


@given(instance_maps())
def test_masks_are_disjoint_and_cover_the_foreground(id_map):
    masks = targets(id_map, 0)["masks"]
    assert masks.dtype == np.uint8 and masks.shape == (len(instance_ids(id_map)), *id_map.shape)
    assert (masks.sum(axis=0) <= 1).all()
    assert np.array_equal(masks.sum(axis=0).astype(bool), id_map != 0)


@given(instance_maps())
def test_area_is_the_box_formula(id_map):
    target = instance_targets(id_map)
    x0, y0, x1, y1 = target["boxes"].T
    assert target["area"].dtype == np.float32
    assert np.array_equal(target["area"], (y1 - y0) * (x1 - x0))
    assert np.array_equal(is_degenerate(target["boxes"]), (x1 <= x0) | (y1 <= y0))


@given(instance_maps(), st.integers(0, 10_000))
def test_equal_to_the_tutorial_formulas(id_map, index):
    ours = targets(id_map, index)
    seed = seed_targets(id_map, index)
    assert set(ours) == set(seed)
    for key, value in seed.items():
        mine = torch.from_numpy(ours[key])
        assert mine.dtype == value.dtype, key
        assert torch.equal(mine, value), key


@given(instance_maps())
def test_compact_map_keeps_every_target(id_map):
    compact = compact_instance_map(id_map)
    assert compact.dtype == np.uint8
    assert instance_ids(compact).tolist() == list(range(1, len(instance_ids(id_map)) + 1))
    for key, value in targets(id_map, 3).items():
        assert np.array_equal(targets(compact, 3)[key], value), key


def test_no_pedestrian_gives_empty_targets_of_the_right_shape():
    target = targets(np.zeros((5, 7), np.uint8), 0)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 5, 7) and target["area"].shape == (0,)


def test_one_pixel_wide_instance_is_degenerate():
    id_map = np.zeros((6, 6), np.uint8)
    id_map[1:5, 2] = 1
    id_map[0:3, 3:6] = 2
    assert is_degenerate(instance_targets(id_map)["boxes"]).tolist() == [True, False]


@given(instance_maps())
def test_flipped_boxes_are_the_boxes_of_the_flipped_map(id_map):
    boxes = instance_targets(id_map)["boxes"]
    flipped = instance_targets(np.ascontiguousarray(id_map[:, ::-1]))["boxes"]
    assert np.array_equal(flip_boxes(boxes, id_map.shape[1]), flipped)


@pytest.mark.parametrize("count", [256, 300])
def test_more_instances_than_uint8_holds_is_refused(count):
    id_map = np.arange(1, count + 1, dtype=np.uint16).reshape(1, -1)
    with pytest.raises(TooManyInstances, match=f"{count} instances"):
        compact_instance_map(id_map)
    assert compact_instance_map(id_map[:, :255]).max() == 255  # the limit itself is fine
