"""The HDF5 cache of images and ready targets: `Cache` reads it, `build` writes it.

`python -m lean.cache build|info|verify` is its command line.
"""

from lean.cache.reader import Cache
from lean.cache.writer import build

__all__ = ["Cache", "build"]
