"""The HDF5 cache of images and ready targets: `Cache` reads it, `build` writes it.

`python -m lean.cache build|info|verify|export` is its command line (lean.cache.command). Both names are
imported when first asked for, so that the command starts, and takes Ctrl-C, before torch is loaded.
"""

__all__ = ["Cache", "build"]


def __getattr__(name):
    if name == "Cache":
        from lean.cache.reader import Cache

        return Cache
    if name == "build":
        from lean.cache.writer import build

        return build
    raise AttributeError(f"module 'lean.cache' has no attribute {name!r}")
