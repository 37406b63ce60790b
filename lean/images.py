"""Reading images: one decoder wherever lean reads pixels (building a cache, the loader decoding stored
files, prediction), so that a cache of decoded pixels and one of the files' own bytes hold the same
images.

torchvision's decoders (libpng, libjpeg-turbo), asked for RGB: grayscale, palette and alpha images
come back as three channels, and 16-bit images are scaled to 8 bits rather than clipped.
"""

import re
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from lean.errors import LeanError, reason

MAX_PIXELS = 178_956_970  # PIL refuses to open larger images, as possible decompression bombs
SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}  # of the images lean looks for: those its decoder reads
DECODED = ("PNG", "JPEG", "GIF", "WEBP")  # PIL's names of the formats torchvision's decode_image reads

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, not a dependency of lean; until lean
# moves, the notice would be printed by every process that decodes.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


def read_header(file, what="image", name=None):
    """(height, width, format) of an image file (a path or a file object), from its header alone (PIL's format
    name: "PNG", "JPEG", ...). Refused, each in one line: images of more than MAX_PIXELS, as PIL refuses them,
    formats decode_rgb does not read, and animations; `what` and `name` (by default `file`) name the file."""
    name = file if name is None else name
    too_large = LeanError(f"{name}: more than the {MAX_PIXELS / 1e6:.0f} megapixels lean takes in one image (PIL's "
                          "limit against decompression bombs); cut it into tiles")  # fmt: skip
    try:
        with warnings.catch_warnings():  # PIL warns from half its limit on; the limit is where lean draws the line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                kind, frames = image.format, getattr(image, "n_frames", 1)
    except Image.DecompressionBombError:
        raise too_large from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise LeanError(f"{name}: not a readable {what} ({reason(error)})") from None
    if width * height > MAX_PIXELS:  # lean's own bound, whatever PIL's global limit has been set to
        raise too_large
    if kind not in DECODED:
        raise LeanError(f"{name}: a {kind} image; lean reads {', '.join(DECODED)} (convert it to PNG)")
    if frames > 1:
        raise LeanError(f"{name}: an animation ({frames} frames); lean reads still images")
    return height, width, kind


def decode_rgb(data, name="image", what="image", orient=False):
    """3 x H x W uint8 RGB tensor from an image file's bytes (a bytes-like or uint8 tensor); `name` and
    `what` ("image", "PNG", ...) name it in the error. `orient`: turned as its EXIF orientation says, as a
    viewer shows it (the cache keeps the stored orientation, the one annotations' coordinates refer to)."""
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=orient)
    except (RuntimeError, ValueError) as error:
        raise LeanError(f"{name}: not a readable {what} ({_decoder_reason(error)})") from None
    if image.ndim != 3:  # an animation's frames
        raise LeanError(f"{name}: an animation ({image.shape[0]} frames); lean reads still images")
    if image.dtype != torch.uint8:  # 16 bits a channel
        image = image.to(torch.float32).mul_(255 / 65535).round_().to(torch.uint8)
    return image


def _decoder_reason(error):
    """The decoder's reason, without the C++ source file and line torchvision puts before it ("decode_jpeg,
    /.../decode_jpeg.cpp:171, Image is incomplete or truncated": the last part)."""
    text = reason(error)
    located = re.match(r"\w+, \S+\.(?:cpp|cu|h):\d+, (.+)", text)
    return located.group(1) if located else text


def read_rgb(data, name="image", what="image"):
    """H x W x 3 uint8 numpy RGB pixels from an image file's bytes."""
    return np.ascontiguousarray(decode_rgb(data, name, what).permute(1, 2, 0).numpy())


def png_marked(path, mark):
    """Whether the file at `path` is a PNG whose "Software" text is `mark`: a picture a lean command drew, and so
    one it may draw over."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == mark
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
