"""One image reader: every decodable kind decoded alike, everything else one line saying what it is."""

import io

import numpy as np
import pytest
from PIL import Image

from lean.errors import LeanError
from lean.images import decode_rgb


def test_a_truncated_jpeg_is_one_line_in_the_users_words_not_the_decoders_source():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    with pytest.raises(LeanError) as error:
        decode_rgb(buffer.getvalue()[:800], "holiday.jpg")
    assert str(error.value) == "holiday.jpg: not a readable image (Image is incomplete or truncated)"
