"""The Penn-Fudan source: PNG folders read as the tutorial reads them."""

import numpy as np
from PIL import Image

from lean.cache import Cache, build
from lean.pennfudan import PennFudanSource
from lean.predict import read_image
from tests.conftest import write_pennfudan


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    levels = (np.arange(6 * 8).reshape(6, 8) * 1300).astype(np.uint16)  # 0 .. 61100 of 65535
    id_map = np.zeros((6, 8), np.uint8)
    id_map[1:4, 2:6] = 1
    root = write_pennfudan(tmp_path / "d", [("a", np.zeros((6, 8, 3), np.uint8), id_map)])
    Image.fromarray(levels).save(root / "PNGImages" / "a.png")
    assert Image.open(root / "PNGImages" / "a.png").mode.startswith("I;16")
    expected = np.round(levels * (255 / 65535)).astype(np.uint8)
    cache = Cache(build(PennFudanSource(root), tmp_path / "c.h5", workers=0, progress=False))
    assert np.array_equal(cache.image(0), np.repeat(expected[..., None], 3, axis=2))  # not all white
    assert np.array_equal(read_image(root / "PNGImages" / "a.png")[0].numpy(), expected)


def test_a_dense_id_map_is_encoded_one_mask_at_a_time():
    import tracemalloc

    from lean.example import from_instance_map

    id_map = np.zeros((1000, 1000), np.uint16)
    for k in range(300):  # 300 pedestrians of 20 x 20 px, down the diagonal
        id_map[3 * k : 3 * k + 20, 3 * k : 3 * k + 20] = k + 1
    tracemalloc.start()
    try:
        example = from_instance_map(id_map, b"")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    crops, _, _ = example.encoded_masks()
    assert len(crops) == 300 and peak < 60 * id_map.size  # all 300 masks at once: 300 MB
