"""The loader: what reaches the model, the same on every pass and device, and that it cleans up after itself."""

import gc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lean.cache import Cache, build
from lean.loader import Loader
from lean.staging import (
    Slot,
)
from lean.targets import targets as derive_targets
from tests.conftest import ArraySource, ExampleSource, loader_threads, overlapping_example
from tests.strategies import instance_maps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_same_seed_same_batches_other_epoch_other_order(cache):
    loader = Loader(cache, device="cpu", seed=3)
    loader.set_epoch(2)
    first, again = loader.batches(), Loader(cache, device="cpu", seed=3)
    again.set_epoch(2)
    assert first == again.batches()
    loader.set_epoch(3)
    assert loader.batches() != first


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


def test_an_error_making_a_batch_on_the_cpu_reaches_the_consumer_and_the_cache_stays_usable(cache, monkeypatch):
    def broken(*args):
        raise OSError("disk gone")

    with monkeypatch.context() as patched:
        patched.setattr("lean.staging.mapped_parts", broken)
        with pytest.raises(OSError, match="disk gone"):
            list(Loader(cache, device="cpu"))
    assert len(list(Loader(cache, batch_size=5, device="cpu"))) == 5


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
    assert loader_threads() == []


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


def test_a_cache_rewritten_in_place_while_it_loads_is_one_line_not_a_bus_error(tmp_path):
    import subprocess
    import sys

    from lean.synthetic import SyntheticSource

    path = build(SyntheticSource(6, seed=1), tmp_path / "c.h5", workers=0, progress=False)
    script = f"""
import os
from lean.cache import Cache
from lean.errors import LeanError
from lean.loader import Loader
batches = iter(Loader(Cache({str(path)!r}), batch_size=2, device="cpu", shuffle=False))
next(batches)
with open({str(path)!r}, "r+b") as file:  # what copying another file over it does first
    file.truncate(os.path.getsize({str(path)!r}) // 4)
try:
    next(batches)
except LeanError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7: SIGBUS
    assert "the cache changed on disk while in use" in done.stdout
