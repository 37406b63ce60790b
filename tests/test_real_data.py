"""The real Penn-Fudan dataset, where $LEAN_PENNFUDAN points at it (CI sets it when the data is present)."""

import numpy as np
import pytest
import torch
from PIL import Image

from bench.seed_pipeline import SeedPennFudan, seed_targets
from lean.cache import Cache, build
from lean.pennfudan import PennFudanSource
from tests.conftest import REAL_DATA

pytestmark = pytest.mark.skipif(not REAL_DATA, reason="set LEAN_PENNFUDAN to the PennFudanPed folder")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return Cache(build(PennFudanSource(REAL_DATA), tmp_path_factory.mktemp("real") / "pennfudan.h5", progress=False))


def test_all_170_images_and_423_pedestrians(real_cache):
    assert len(real_cache) == 170
    assert real_cache.instance_offsets[-1] == 423
    assert real_cache.names == [name[: -len(".png")] for name in SeedPennFudan(REAL_DATA).images]


def test_targets_equal_the_tutorial_formulas_image_by_image(real_cache):
    seed = SeedPennFudan(REAL_DATA)
    for i in range(len(real_cache)):
        mask_path = f"{REAL_DATA}/PedMasks/{seed.masks[i]}"
        expected = seed_targets(np.array(Image.open(mask_path)), i)
        got = real_cache.target(i)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (seed.masks[i], key)
        image = np.asarray(Image.open(f"{REAL_DATA}/PNGImages/{seed.images[i]}").convert("RGB"))
        assert np.array_equal(real_cache.image(i), image)
        assert tuple(real_cache.sizes[i]) == seed.get_height_and_width(i)
