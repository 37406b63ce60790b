"""Hypothesis strategies the test modules share."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

# (height, width) of 1-60 images, as a dataset's sizes
image_sizes = st.lists(st.tuples(st.integers(20, 400), st.integers(20, 400)), min_size=1, max_size=60)


@st.composite
def instance_maps(draw):
    """Any size from 1 x 1, any ids (sparse, large, or none), scattered pixels or solid rectangles."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32]))
    top = 65535 if dtype != np.uint8 else 255
    palette = draw(st.lists(st.integers(1, top), min_size=0, max_size=8, unique=True))
    if draw(st.booleans()):  # scattered: every pixel independent
        values = st.sampled_from([0, *palette])
        return draw(arrays(dtype, (height, width), elements=values))
    id_map = np.zeros((height, width), dtype=dtype)
    for instance in palette:  # rectangles, later ones over earlier ones, often cut by a border
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        y1, x1 = draw(st.integers(y0, height - 1)), draw(st.integers(x0, width - 1))
        id_map[y0 : y1 + 1, x0 : x1 + 1] = instance
    return id_map
