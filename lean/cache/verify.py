"""Check a cache against its source by deriving every example again."""

import numpy as np

from lean.cache.writer import derive


def first_mismatch(cache, source, progress=None):
    """None when every example of `source` derives to exactly what `cache` holds, else one line naming the first
    difference."""
    if len(cache) != len(source):
        return f"the cache holds {len(cache)} images, the source {len(source)}"
    for i, name in enumerate(source.names):
        if cache.names[i] != name:
            return f"image {i}: the cache has {cache.names[i]}, the source {name}"
        image, id_map, targets, _ = derive(source, i)
        for what, cached, derived in (
            ("pixels", cache.image(i), image),
            ("instance map", cache.instance_map(i), id_map),
        ):
            if cached.shape != derived.shape or not np.array_equal(cached, derived):
                return f"{name}: {what} differ from the source"
        stored = cache.instance_targets(i)
        for field, derived in targets.items():
            if stored[field].dtype != derived.dtype or not np.array_equal(stored[field], derived):
                return f"{name}: {field} differ (cache {stored[field].tolist()}, source {derived.tolist()})"
        if progress:
            progress.update()
    return None
