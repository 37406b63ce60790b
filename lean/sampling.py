"""Which images a run trains and tests on, which form each batch, which are flipped and, with repeat-factor
sampling, how often each comes: pure functions of (seed, epoch) and the images' sizes and labels, numpy
only, so every run, on any device, resumed at any batch, sees the same batches.
"""

import math
from collections import Counter

import numpy as np

# Aspect-ratio bin edges on H / W, as torchvision's references make them (2 ** linspace(-1, 1, 7)).
ASPECT_EDGES = 2.0 ** np.linspace(-1, 1, 7)
TUTORIAL_TEST_SIZE = 50


def split_indices(count, seed=0, test_size=None):
    """(train, test) cache indices: a seeded permutation, its last `test_size` for testing.

    The tutorial's split: 50 test images (120 train on Penn-Fudan). A dataset
    too small for that keeps a fifth for testing, at least one image.
    """
    if test_size is None:
        test_size = TUTORIAL_TEST_SIZE if count >= 2 * TUTORIAL_TEST_SIZE else max(1, count // 5)
    if not 0 < test_size < count:
        raise ValueError(f"test size {test_size} leaves no image to train or test on out of {count}")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:-test_size]), np.sort(order[-test_size:])


def aspect_groups(sizes):
    """Aspect-ratio bin of every image, from its (H, W)."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    return np.digitize(sizes[:, 0] / sizes[:, 1], ASPECT_EDGES)


def epoch_batches(groups, indices, batch_size, seed, epoch, rank=0, world_size=1, drop_last=False):
    """The batches (lists of cache indices) rank `rank` sees in `epoch`.

    A fresh permutation per (seed, epoch), shared by all ranks, is split into
    world_size interleaved shards of equal length: with drop_last the tail
    that does not divide evenly is left out, else the permutation wraps
    around to fill the last places (as DistributedSampler does). Within a
    shard, batches are filled one aspect-ratio group at a time; what is left
    in the groups at the end is batched together, so every batch but the last
    is full and every rank has the same number of batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(indices))
    if world_size > 1:
        if drop_last:
            order = order[: len(order) // world_size * world_size]
        else:
            order = np.resize(order, -(-len(order) // world_size) * world_size)  # wraps around
        order = order[rank::world_size]
    batches, pending = [], {}
    for index in order.tolist():
        group = pending.setdefault(groups[index], [])
        group.append(index)
        if len(group) == batch_size:
            batches.append(group)
            pending[groups[index]] = []
    leftovers = [index for group in pending.values() for index in group]
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def flip_decisions(seed, epoch, count):
    """Whether each cache index is flipped in `epoch`: p = 0.5, independent of batching."""
    return np.random.default_rng([seed, epoch, 1]).random(count) < 0.5


def repeat_factors(image_labels, threshold):
    """Each image's repeat factor under LVIS's repeat-factor sampling (detectron2's RepeatFactorTrainingSampler):
    a class found in a fraction f of the images gets max(1, sqrt(threshold / f)), and an image the largest
    of its classes' (1 with none). `image_labels`: the labels of each image's instances."""
    images = [set(np.asarray(labels).tolist()) for labels in image_labels]
    seen = Counter(label for labels in images for label in labels)
    by_class = {label: max(1.0, math.sqrt(threshold * len(images) / count)) for label, count in seen.items()}
    return np.array([max((by_class[label] for label in labels), default=1.0) for labels in images])


def repeated_indices(indices, factors, seed, epoch):
    """`indices` as `epoch` repeats them, in an epoch ceil(sum r) long every time (lean's schedule and resume count
    in epochs; detectron2, counting iterations, rounds each image on its own and lets the length vary). The
    factors are scaled to that length, r' = r ceil(sum r) / sum r (at least r), and each image comes floor(r')
    times and once more by a seeded systematic draw of the fractional parts: r' times on average."""
    factors = np.asarray(factors, dtype=np.float64)
    length = math.ceil(factors.sum() - 1e-9)
    scaled = factors * (length / factors.sum())
    counts = np.floor(scaled).astype(np.int64)
    rng = np.random.default_rng([seed, epoch, 2])
    order = rng.permutation(len(factors))  # systematic draws along a random order: no neighbour favoured
    reached = np.floor(np.cumsum((scaled - counts)[order]) + rng.random() - 1e-9)
    counts[order] += np.diff(reached, prepend=0.0).astype(np.int64).clip(0)
    return np.repeat(np.asarray(indices), counts)
