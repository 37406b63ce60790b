"""Check a cache: against the checksums it stores, and against its source by loading every example again."""

import numpy as np


def first_corrupted(cache, progress=None):
    """None when what the cache holds for every image still has the checksum it was written with, else one line
    naming the first image that does not."""
    for i in range(len(cache)):
        if not np.array_equal(cache.checksum(i), cache.checksums[i]):
            return f"{cache.names[i]}: its bytes in the cache changed since it was built (checksum)"
        if progress:
            progress.update()
    return None


def first_mismatch(cache, source, progress=None):
    """None when every example of `source` loads to exactly what `cache` holds, else one line naming the first
    difference."""
    if len(cache) != len(source):
        return f"the cache holds {len(cache)} images, the source {len(source)}"
    for i, name in enumerate(source.names):
        if cache.names[i] != name:
            return f"image {i}: the cache has {cache.names[i]}, the source {name}"
        example = source.load(i)
        stored_masks, loaded_masks = cache.mask_parts(i), example.encoded_masks()  # compared as stored: cropped
        for what, cached, loaded in (
            ("pixels", [cache.image(i)], [example.pixels]),
            ("masks", stored_masks, loaded_masks),
        ):
            if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(cached, loaded)):
                return f"{name}: {what} differ from the source"
        stored = cache.instance_targets(i)
        for field, loaded in example.instances().items():
            if stored[field].dtype != loaded.dtype or not np.array_equal(stored[field], loaded):
                return f"{name}: {field} differ (cache {stored[field].tolist()}, source {loaded.tolist()})"
        if progress:
            progress.update()
    return None
