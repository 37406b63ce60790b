"""The loader: which images form which batch, what reaches the model, and that it cleans up after itself."""

import gc
import re
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lean.cache import Cache, build
from lean.errors import LeanError
from lean.loader import Loader, assemble
from lean.sampling import aspect_groups, epoch_batches, split_indices
from lean.staging import (
    Ahead,
    Slot,
    check_decoded_sizes,
    device_decodable,
    mapped_parts,
    pack,
    slot_capacity,
    unpacked_parts,
)
from lean.synthetic import SyntheticSource
from lean.targets import targets as derive_targets
from tests.coco_files import annotation, dataset, polygon, write_coco
from tests.conftest import ArraySource, ExampleSource, overlapping_example
from tests.strategies import image_sizes, instance_maps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(build(SyntheticSource(23, seed=5), tmp_path_factory.mktemp("c") / "c.h5", workers=0, progress=False))


# --- sampling ------------------------------------------------------------------------------------


@given(image_sizes, st.integers(1, 5), st.integers(0, 100), st.integers(0, 5))
def test_every_image_exactly_once_per_epoch(sizes, batch_size, seed, epoch):
    groups = aspect_groups(sizes)
    batches = epoch_batches(groups, np.arange(len(sizes)), batch_size, seed, epoch)
    seen = [index for batch in batches for index in batch]
    assert sorted(seen) == list(range(len(sizes)))
    assert all(len(batch) == batch_size for batch in batches[:-1]) and 0 < len(batches[-1]) <= batch_size


@given(image_sizes, st.integers(1, 4), st.integers(2, 4), st.booleans())
def test_rank_shards_are_equal_disjoint_and_cover(sizes, batch_size, world_size, drop_last):
    groups, indices = aspect_groups(sizes), np.arange(len(sizes))
    shards = [
        epoch_batches(groups, indices, batch_size, 0, 1, rank, world_size, drop_last) for rank in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1  # every rank takes the same number of steps
    seen = [index for shard in shards for batch in shard for index in batch]
    if drop_last:
        assert len(seen) == len(set(seen))  # disjoint; the tail that does not divide evenly is left out
    else:
        assert set(seen) == set(range(len(sizes)))  # covering, with fewer than world_size repeats to even out
        assert len(seen) - len(set(seen)) < world_size
        if len(sizes) % world_size == 0:
            assert len(seen) == len(set(seen))


@given(image_sizes, st.integers(2, 4), st.integers(0, 50))
def test_batches_stay_within_an_aspect_group_but_for_the_leftovers(sizes, batch_size, seed):
    groups = aspect_groups(sizes)
    batches = epoch_batches(groups, np.arange(len(sizes)), batch_size, seed, 0)
    counts = np.bincount(groups)
    leftover_batches = -(-int((counts % batch_size).sum()) // batch_size)
    # every batch but those made at the end from the groups' remainders is of one aspect group
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches[: len(batches) - leftover_batches])
    assert leftover_batches <= -(-int((counts > 0).sum()) * (batch_size - 1) // batch_size)


def test_same_seed_same_batches_other_epoch_other_order(cache):
    loader = Loader(cache, device="cpu", seed=3)
    loader.set_epoch(2)
    first, again = loader.batches(), Loader(cache, device="cpu", seed=3)
    again.set_epoch(2)
    assert first == again.batches()
    loader.set_epoch(3)
    assert loader.batches() != first


def test_aspect_groups_follow_the_ratio():
    groups = aspect_groups([(100, 400), (100, 100), (400, 100), (101, 99)])
    assert groups[0] < groups[1] < groups[2] and groups[1] == groups[3]


def test_tutorial_split_is_120_train_50_test_and_seeded():
    train, test = split_indices(170, seed=0)
    assert len(train) == 120 and len(test) == 50
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(170))
    assert np.array_equal(split_indices(170, seed=0)[1], test)
    assert not np.array_equal(split_indices(170, seed=1)[1], test)
    small_train, small_test = split_indices(20, seed=0)
    assert len(small_test) == 4 and len(small_train) == 16
    with pytest.raises(ValueError):
        split_indices(10, test_size=10)


# --- what reaches the model ----------------------------------------------------------------------


def test_without_flips_targets_equal_the_cache(cache):
    loader = Loader(cache, batch_size=3, device="cpu", train=False, shuffle=False)
    count = 0
    for images, targets in loader:
        for image, target in zip(images, targets):
            i = int(target["image_id"])
            expected = cache.target(i)
            assert set(target) == set(expected)
            for key, value in expected.items():
                assert target[key].dtype == value.dtype and torch.equal(target[key], value), key
            assert image.dtype == torch.float32 and image.shape == (3, *cache.sizes[i])
            pixels = torch.from_numpy(np.array(cache.image(i))).permute(2, 0, 1)
            assert torch.allclose(image, pixels.float() / 255, atol=1e-6)
            count += 1
    assert count == len(cache)


@st.composite
def flip_examples(draw):
    id_map = draw(instance_maps())
    image = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (*id_map.shape, 3), dtype=np.uint8)
    return image, id_map


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(flip_examples(), min_size=2, max_size=5), st.integers(0, 20))
def test_flipped_targets_equal_those_of_the_flipped_mask(tmp_path, examples, seed):
    cache = Cache(build(ArraySource(examples), tmp_path / "c.h5", workers=0, progress=False))
    loader = Loader(cache, batch_size=2, device="cpu", seed=seed, train=True, dtype=torch.uint8)
    flips = loader.flips()
    for images, targets in loader:
        for image, target in zip(images, targets):
            i = int(target["image_id"])
            picture, id_map = examples[i]
            if flips[i]:
                picture, id_map = picture[:, ::-1].copy(), id_map[:, ::-1].copy()
            expected = derive_targets(id_map, i)
            keep = ~(
                (expected["boxes"][:, 2] <= expected["boxes"][:, 0])
                | (expected["boxes"][:, 3] <= expected["boxes"][:, 1])
            )
            assert torch.equal(image, torch.from_numpy(picture).permute(2, 0, 1))
            for key in ("boxes", "masks", "area", "labels", "iscrowd"):
                assert np.array_equal(target[key].numpy(), expected[key][keep]), key


def test_degenerate_instances_are_left_out_of_training_targets_only(tmp_path):
    id_map = np.zeros((12, 12), np.uint8)
    id_map[2:9, 5] = 1  # one pixel wide: a zero-width box
    id_map[3:10, 7:11] = 2
    cache = Cache(
        build(ArraySource([(np.zeros((12, 12, 3), np.uint8), id_map)]), tmp_path / "c.h5", workers=0, progress=False)
    )
    ((_, [train_target]),) = list(Loader(cache, batch_size=1, device="cpu", train=True))
    ((_, [eval_target]),) = list(Loader(cache, batch_size=1, device="cpu", train=False))
    assert len(eval_target["boxes"]) == 2 and len(train_target["boxes"]) == 1
    assert train_target["masks"].sum() == 7 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_the_device_path_assembles_what_the_cpu_path_does(cache, dtype):
    # The CUDA path packs into a slot and unpacks views of the copied bytes; on the CPU it can be run as it is.
    loader = Loader(cache, batch_size=4, device="cpu", seed=1)
    slot = Slot(slot_capacity(loader.cache, loader.batch_size), pinned=False)  # pinning needs CUDA
    flips = loader.flips()
    for batch in loader.batches():
        instances = loader._batch_instances(batch, flips)
        used = pack(cache, batch, instances, slot)
        packed = assemble(unpacked_parts(slot.buffer[:used], slot.layout, flips), flips, dtype)
        mapped = assemble(mapped_parts(cache, batch, instances, flips), flips, dtype)
        for got, want in zip(packed[0], mapped[0]):
            assert torch.equal(got, want)
        for got, want in zip(packed[1], mapped[1]):
            assert all(torch.equal(got[key], want[key]) for key in want)


@pytest.fixture(scope="module")
def photo_caches(tmp_path_factory):
    """(raw, encoded) caches of a COCO folder of five JPEGs and one PNG, two overlapping instances each."""
    from lean.coco import CocoSource

    folder = tmp_path_factory.mktemp("photos")
    names = [f"{k}.png" if k == 2 else f"sub/{k}.jpg" for k in range(6)]
    images = [{"id": k + 1, "file_name": name, "width": 48 + 8 * k, "height": 40} for k, name in enumerate(names)]
    overlapping = [(2 * k + j + 1, k + 1, j + 1, 4 + 6 * j) for k in range(6) for j in range(2)]
    instances = [annotation(n, image_id, label, [polygon(x, 5, 20, 20)], bbox=[x, 5, 20, 20])
                 for n, image_id, label, x in overlapping]  # fmt: skip
    path = write_coco(folder, dataset(instances, images))
    for image in images[:2] + images[3:]:  # smooth pixels, as in photos, not write_coco's noise
        y, x = np.mgrid[: image["height"], : image["width"]]
        pixels = np.stack([64 + 2 * x, 96 + 3 * y, 200 - x - y], -1)
        pixels[10:30, 12:28] = 230
        # Colour at full resolution: decoders differ in how they upsample subsampled colour, not in where pixels go.
        Image.fromarray(pixels.astype(np.uint8)).save(folder / image["file_name"], "JPEG", quality=90, subsampling=0)
    return tuple(
        Cache(build(CocoSource(path), folder / f"{kind}.h5", workers=0, progress=False, pixels=kind))
        for kind in ("raw", "encoded")
    )


def test_images_decoded_on_the_device_fill_the_places_packing_left_for_them(photo_caches):
    # What the CUDA path does with nvJPEG's images, run on the CPU with the CPU's decoder in its place.
    from torchvision.io import decode_jpeg

    raw, encoded = photo_caches
    loader = Loader(encoded, batch_size=3, device="cpu", seed=2, dtype=torch.uint8)
    slot = Slot(slot_capacity(loader.cache, loader.batch_size), pinned=False)
    flips = loader.flips()
    want = Loader(raw, batch_size=3, device="cpu", seed=2, dtype=torch.uint8)
    for batch, (want_images, want_targets) in zip(loader.batches(), want):
        jpegs = device_decodable(encoded, batch)
        assert len(jpegs) == len([i for i in batch if encoded.names[i].endswith(".jpg")])
        decoded = {i: decode_jpeg(torch.from_numpy(encoded.encoded(i).copy())) for i in jpegs}
        used = pack(encoded, batch, loader._batch_instances(batch, flips), slot, jpegs)
        images, targets = assemble(unpacked_parts(slot.buffer[:used], slot.layout, flips, decoded), flips, torch.uint8)
        assert all(torch.equal(got, want) for got, want in zip(images, want_images))
        assert all(torch.equal(got[key], want[key]) for got, want in zip(targets, want_targets) for key in want)


def test_an_image_decoded_to_another_size_than_the_cache_records_is_one_line_naming_it(photo_caches):
    _, encoded = photo_caches
    height, width = (int(side) for side in encoded.sizes[1])
    check_decoded_sizes(encoded, {1: torch.zeros(3, height, width, dtype=torch.uint8)})
    message = f"{encoded.names[1]} decodes to {(height, width + 1)}, not the cached size {(height, width)}"
    with pytest.raises(LeanError, match=re.escape(message)):
        check_decoded_sizes(encoded, {1: torch.zeros(3, height, width + 1, dtype=torch.uint8)})


# --- determinism and resume ----------------------------------------------------------------------


def _epoch(loader):
    seen = []
    for images, targets in loader:
        seen.append(
            [(int(t["image_id"]), float(image.sum()), t["boxes"].tolist()) for image, t in zip(images, targets)]
        )
    return seen


def test_an_epoch_reads_the_same_the_second_time_and_from_a_new_loader(cache):
    loader = Loader(cache, batch_size=2, device="cpu", seed=9)
    loader.set_epoch(4)
    again = Loader(cache, batch_size=2, device="cpu", seed=9)
    again.set_epoch(4)
    assert _epoch(loader) == _epoch(loader) == _epoch(again)


def test_resume_from_a_batch_index_gives_the_rest_of_the_epoch(cache):
    loader = Loader(cache, batch_size=2, device="cpu", seed=9)
    loader.set_epoch(1)
    full = _epoch(loader)
    loader.set_epoch(1, start_batch=5)
    assert _epoch(loader) == full[5:]
    assert len(loader) == len(full)


# --- shutdown ------------------------------------------------------------------------------------


def _loader_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("lean-loader")]


def test_breaking_out_of_an_epoch_stops_the_thread():
    ahead = Ahead(lambda batch: batch, list(range(50)))
    for _ in ahead:
        assert _loader_threads()
        break
    ahead.stop()
    assert _loader_threads() == []


def test_the_thread_hands_over_every_batch_in_order_however_slow_the_consumer():
    ahead = Ahead(lambda batch: batch * 2, list(range(30)))
    seen = []
    for item in ahead:
        seen.append(item)
        time.sleep(0.001 if item % 3 else 0)
    ahead.stop()
    assert seen == [2 * batch for batch in range(30)]


def test_an_error_in_the_thread_reaches_the_consumer():
    def broken(batch):
        if batch == 3:
            raise OSError("disk gone")
        return batch

    ahead = Ahead(broken, list(range(10)))
    with pytest.raises(OSError, match="disk gone"):
        list(ahead)
    ahead.stop()
    assert _loader_threads() == []


def test_an_error_making_a_batch_on_the_cpu_reaches_the_consumer_and_the_cache_stays_usable(cache, monkeypatch):
    def broken(*args):
        raise OSError("disk gone")

    with monkeypatch.context() as patched:
        patched.setattr("lean.staging.mapped_parts", broken)
        with pytest.raises(OSError, match="disk gone"):
            list(Loader(cache, device="cpu"))
    assert len(list(Loader(cache, batch_size=5, device="cpu"))) == 5


def test_training_has_glibc_keep_freed_batches_and_a_loader_leaves_the_process_alone(cache, monkeypatch):
    import lean.speed
    import lean.train

    calls = []
    monkeypatch.setattr("lean.speed.keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr("lean.train.train", lambda *args: 0)
    Loader(cache, device="cpu")
    assert calls == []  # a process-wide setting: the entry point's to make, in plain view
    assert lean.train.main(["--device", "cpu"]) == 0
    assert calls == [1]
    monkeypatch.undo()
    assert lean.speed.keep_freed_memory()  # glibc accepted the settings (this machine runs glibc)


def test_freed_blocks_past_glibcs_mapping_threshold_are_reused_not_faulted_in_again():
    import resource

    import lean.speed

    assert lean.speed.keep_freed_memory()
    floats = 64 << 18  # 64 MiB of float32: past the 32 MiB that glibc would otherwise map afresh each time
    pages = floats * 4 // 4096

    def step():  # a large tensor written and freed, with a small one made after it as real code does
        large, small = torch.ones(floats), torch.zeros(100)
        del large
        return small

    for _ in range(12):  # the heap settles: a few blocks' worth of free space stays for reuse
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < pages, faults  # mapped afresh, each of the 5 would fault in all its pages again


# --- CUDA (skipped without a GPU) ----------------------------------------------------------------


@cuda
def test_cuda_batches_equal_cpu_batches(cache):
    for dtype in (torch.float32, torch.uint8):
        on_gpu = Loader(cache, batch_size=3, device="cuda", seed=2, dtype=dtype)
        on_cpu = Loader(cache, batch_size=3, device="cpu", seed=2, dtype=dtype)
        for (gpu_images, gpu_targets), (cpu_images, cpu_targets) in zip(on_gpu, on_cpu):
            for got, want in zip(gpu_images, cpu_images):
                assert got.device.type == "cuda" and torch.allclose(got.cpu(), want)
            for got, want in zip(gpu_targets, cpu_targets):
                assert all(got[key].device.type == "cuda" and torch.equal(got[key].cpu(), want[key]) for key in want)


@cuda
def test_cuda_decodes_a_caches_jpegs_with_nvjpeg_close_to_the_cpus_decoder(photo_caches):
    raw, encoded = photo_caches
    for dtype in (torch.uint8, torch.float32):
        on_cpu = Loader(raw, batch_size=3, device="cpu", seed=2, dtype=dtype)
        on_host = Loader(encoded, batch_size=3, device="cuda", seed=2, dtype=dtype, device_decode=False)
        on_gpu = Loader(encoded, batch_size=3, device="cuda", seed=2, dtype=dtype)
        for (gpu_images, gpu_targets), (host_images, _), (want_images, want_targets) in zip(on_gpu, on_host, on_cpu):
            for got, host, want, target in zip(gpu_images, host_images, want_images, want_targets):
                assert got.device.type == "cuda" and got.shape == want.shape and torch.equal(host.cpu(), want)
                difference = (got.cpu().float() - want.float()).abs() * (255 if dtype.is_floating_point else 1)
                if encoded.names[int(target["image_id"])].endswith(".png"):
                    assert difference.max() == 0  # decoded on the CPU and copied
                else:  # two JPEG decoders agree to within rounding of their inverse DCTs
                    assert difference.mean() < 1.5
            for got, want in zip(gpu_targets, want_targets):
                assert all(torch.equal(got[key].cpu(), want[key]) for key in want)


@cuda
def test_cuda_slots_are_pinned_and_freed_when_the_epoch_is_abandoned(cache):
    loader = Loader(cache, batch_size=2, device="cuda")
    assert Slot(1024).buffer.is_pinned()
    for _ in loader:
        break
    gc.collect()
    assert _loader_threads() == []


@cuda
def test_cuda_copy_overlaps_compute(cache):
    # While the caller's kernels run, the next batch is already on its way: the consumer barely waits.
    loader = Loader(cache, batch_size=2, device="cuda")
    work = torch.randn(2048, 2048, device="cuda")
    for _images, _ in loader:
        for _ in range(20):
            work = (work @ work).tanh_()
    torch.cuda.synchronize()
    assert loader.wait_seconds < 0.5


def test_overlapping_instances_survive_build_loader_and_flip(tmp_path):
    examples = [overlapping_example(seed) for seed in range(6)]
    assert any((example.masks.sum(0) > 1).any() for example in examples)  # the masks do overlap
    cache = Cache(build(ExampleSource(examples), tmp_path / "c.h5", workers=0, progress=False))
    for i, example in enumerate(examples):
        assert np.array_equal(cache.masks(i), example.masks)
    loader = Loader(cache, batch_size=2, device="cpu", seed=3, train=True, dtype=torch.uint8)
    flips = loader.flips()
    assert flips.any() and not flips.all()
    for images, targets in loader:
        for image, target in zip(images, targets):
            example = examples[int(target["image_id"])]
            masks, pixels, boxes = example.masks, example.pixels, example.boxes.copy()
            if flips[int(target["image_id"])]:
                masks, pixels = masks[:, :, ::-1], pixels[:, ::-1]
                boxes[:, [0, 2]] = example.size[1] - example.boxes[:, [2, 0]]  # exclusive boxes: x0' = W - x1
            assert np.array_equal(target["masks"].numpy(), masks)
            assert np.array_equal(target["boxes"].numpy(), boxes)
            assert torch.equal(image, torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))


def test_a_cache_of_encoded_pixels_loads_the_same_batches(small_folder_cache_pair):
    raw, encoded = small_folder_cache_pair
    for dtype in (torch.uint8, torch.float32):
        got = list(Loader(encoded, batch_size=2, device="cpu", seed=4, dtype=dtype))
        want = list(Loader(raw, batch_size=2, device="cpu", seed=4, dtype=dtype))
        for (got_images, got_targets), (want_images, want_targets) in zip(got, want):
            assert all(torch.equal(a, b) for a, b in zip(got_images, want_images))
            assert all(torch.equal(a[key], b[key]) for a, b in zip(got_targets, want_targets) for key in b)


@pytest.fixture
def small_folder_cache_pair(small_folder, tmp_path):
    from lean.pennfudan import PennFudanSource

    source = PennFudanSource(small_folder)
    return tuple(
        Cache(build(source, tmp_path / f"{kind}.h5", workers=0, progress=False, pixels=kind))
        for kind in ("raw", "encoded")
    )
