"""Staging: a batch's bytes packed, copied and unpacked as the CPU path reads them, and the loader's thread."""

import re
import time

import pytest
import torch

from lean.errors import LeanError
from lean.loader import Loader, assemble
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
from tests.conftest import loader_threads


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


# --- the background thread ---------------------------------------------------------------------


def test_breaking_out_of_an_epoch_stops_the_thread():
    ahead = Ahead(lambda batch: batch, list(range(50)))
    for _ in ahead:
        assert loader_threads()
        break
    ahead.stop()
    assert loader_threads() == []


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
    assert loader_threads() == []
