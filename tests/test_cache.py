"""The cache round trip, the build command, and every kind of bad input it must refuse cleanly."""

import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lean.cache import Cache, build
from lean.cache.command import main as cache_main
from lean.errors import LeanError
from lean.pennfudan import PennFudanSource
from lean.synthetic import SyntheticSource, synthesize
from lean.targets import targets
from lean.train import main as train_main
from tests.conftest import (
    QUICK,
    ArraySource,
    build_writing,
    cli,
    foreground_ctrl_c,
    one_line,
    wait_for,
    write_pennfudan,
)
from tests.strategies import instance_maps


@st.composite
def examples(draw):
    id_map = draw(instance_maps())
    seed = draw(st.integers(0, 2**16))
    image = np.random.default_rng(seed).integers(0, 256, (*id_map.shape, 3), dtype=np.uint8)
    return image, id_map


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(examples(), min_size=1, max_size=4))
def test_round_trip_returns_what_the_functions_return(tmp_path, batch):
    path = build(ArraySource(batch), tmp_path / "c.h5", workers=0, progress=False)
    cache = Cache(path)
    assert len(cache) == len(batch)
    assert cache.sizes.tolist() == [list(image.shape[:2]) for image, _ in batch]
    for i, (image, id_map) in enumerate(batch):
        assert cache.image(i).dtype == np.uint8 and np.array_equal(cache.image(i), image)
        expected = targets(id_map, i)
        got = cache.target(i)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key].numpy().dtype == value.dtype, key
            assert np.array_equal(got[key].numpy(), value), key


def test_parallel_build_equals_serial_build(tmp_path):
    source = SyntheticSource(12, seed=3)
    serial = Cache(build(source, tmp_path / "serial.h5", workers=0, progress=False))
    parallel = Cache(build(source, tmp_path / "parallel.h5", workers=2, progress=False))
    assert serial.fingerprint == parallel.fingerprint and serial.names == parallel.names
    for i in range(len(source)):
        assert np.array_equal(serial.image(i), parallel.image(i))
        assert np.array_equal(serial.masks(i), parallel.masks(i))
    assert all(np.array_equal(serial.instances[k], parallel.instances[k]) for k in serial.instances)


def test_synthetic_source_is_a_function_of_its_arguments():
    first, again, other = SyntheticSource(5, 1), SyntheticSource(5, 1), SyntheticSource(5, 2)
    assert [first.load(i).digest for i in range(5)] == [again.load(i).digest for i in range(5)]
    assert [first.load(i).digest for i in range(5)] != [other.load(i).digest for i in range(5)]
    assert first.sizes().tolist() == [list(first.load(i).pixels.shape[:2]) for i in range(5)]


def test_a_rare_class_is_drawn_about_as_much_less_often_as_asked_and_rare_one_is_the_plain_set():
    labels = np.concatenate([SyntheticSource(150, 0, classes=3, rare=10).load(i).labels for i in range(150)])
    counts = np.bincount(labels, minlength=4)[1:]
    assert 5 <= min(counts[:2]) / counts[2] <= 20  # ten times rarer, within a draw's spread
    plain, rare_one = SyntheticSource(4, 1, classes=3), SyntheticSource(4, 1, classes=3, rare=1)
    assert [plain.load(i).digest for i in range(4)] == [rare_one.load(i).digest for i in range(4)]
    assert "rare" not in rare_one.params() and SyntheticSource(4, 1, classes=3, rare=10).params()["rare"] == 10


def test_cache_opens_lazily_in_each_process(tmp_path):
    cache = Cache(build(SyntheticSource(4, 0), tmp_path / "c.h5", workers=0, progress=False))
    cache.image(0)
    assert len(pickle.dumps(cache)) < 10_000  # the pixels stay in the file
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        sums = pool.map(_pixel_sum, [(cache, i) for i in range(4)])
    assert sums == [int(cache.image(i).sum()) for i in range(4)]


def _pixel_sum(job):
    cache, i = job
    return int(cache.image(i).sum())


# --- the build command on PNG folders -------------------------------------------------------------


def test_build_command_pairs_files_by_name(small_folder, tmp_path, capsys):
    out = tmp_path / "c.h5"
    status, stdout, _ = cli(
        cache_main, ["build", "--root", str(small_folder), "--out", str(out), "--workers", "2"], capsys
    )
    assert status == 0 and "6 images" in stdout
    cache = Cache(out)
    assert cache.names == sorted(p.stem for p in (small_folder / "PNGImages").iterdir())
    for i, name in enumerate(cache.names):
        image = np.asarray(Image.open(small_folder / "PNGImages" / f"{name}.png"))
        assert np.array_equal(cache.image(i), image)


def test_info_and_verify_report_on_a_good_cache(small_folder, tmp_path, capsys):
    out = str(tmp_path / "c.h5")
    cli(cache_main, ["build", "--root", str(small_folder), "--out", out], capsys)
    status, stdout, _ = cli(cache_main, ["info", out], capsys)
    per_image = np.diff(Cache(out).instance_offsets)
    negatives = (per_image == 0).sum()
    counts = f"{per_image.sum()} ({per_image.min()}-{per_image.max()} per image, {negatives} images without any"
    assert status == 0 and "images       6" in stdout and f"instances    {counts}" in stdout
    assert Cache(out).fingerprint in stdout
    status, stdout, _ = cli(cache_main, ["verify", out], capsys)
    assert status == 0 and stdout.startswith("OK")


def test_verify_names_the_first_mismatch(small_folder, tmp_path, capsys):
    out = str(tmp_path / "c.h5")
    cli(cache_main, ["build", "--root", str(small_folder), "--out", out], capsys)
    mask_path = small_folder / "PedMasks" / "Ped00002_mask.png"
    id_map = np.asarray(Image.open(mask_path)).copy()
    id_map[0, 0] = id_map.max() + 1  # a new one-pixel pedestrian
    Image.fromarray(id_map).save(mask_path)
    status, stdout, _ = cli(cache_main, ["verify", out], capsys)
    assert status == 1 and "MISMATCH" in stdout and "Ped00002" in stdout


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_non_rgb_images_are_converted_to_rgb(tmp_path, mode):
    image, id_map = np.full((9, 11, 3), 100, np.uint8), np.zeros((9, 11), np.uint8)
    id_map[2:5, 3:8] = 1
    root = write_pennfudan(tmp_path / "d", [("a", image, id_map)])
    Image.fromarray(image).convert(mode).save(root / "PNGImages" / "a.png")
    cache = Cache(build(PennFudanSource(root), tmp_path / "c.h5", workers=0, progress=False))
    expected = np.asarray(Image.open(root / "PNGImages" / "a.png").convert("RGB"))
    assert cache.image(0).shape == (9, 11, 3) and np.array_equal(cache.image(0), expected)


def test_a_mask_with_more_instances_than_a_byte_counts_keeps_them_all(tmp_path):
    image, id_map = np.zeros((20, 30, 3), np.uint8), (np.arange(600) % 300 + 1).astype(np.uint16).reshape(20, 30)
    root = write_pennfudan(tmp_path / "d", [("a", image, id_map)])
    cache = Cache(build(PennFudanSource(root), tmp_path / "c.h5", workers=0, progress=False))
    assert np.array_equal(cache.masks(0), targets(id_map, 0)["masks"])  # format 1's uint8 maps stopped at 255


def test_sixteen_bit_masks_with_sparse_ids_are_renumbered(tmp_path):
    image, id_map = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint16)
    id_map[0:3, 0:3], id_map[4:8, 4:8] = 1000, 300
    root = write_pennfudan(tmp_path / "d", [("a", image, id_map)])
    assert Image.open(root / "PedMasks" / "a_mask.png").mode.startswith("I")
    cache = Cache(build(PennFudanSource(root), tmp_path / "c.h5", workers=0, progress=False))
    assert cache.target(0)["boxes"].tolist() == [[4, 4, 7, 7], [0, 0, 2, 2]]  # id 300 before id 1000


# --- bad input: one line naming the file, a non-zero exit, the old cache untouched -----------------


def _break_truncated(root):
    path = root / "PNGImages" / "Ped00001.png"
    path.write_bytes(path.read_bytes()[:200])
    return path.name, "not a readable PNG"


def _break_not_png(root):
    path = root / "PNGImages" / "Ped00002.png"
    Image.open(path).convert("RGB").save(path, format="JPEG")
    return path.name, "not a PNG file"


def _break_size_mismatch(root):
    path = root / "PedMasks" / "Ped00003_mask.png"
    Image.open(path).crop((0, 0, 40, 30)).save(path)
    return path.name, "mask is 40x30 but its image"


def _break_missing_mask(root):
    (root / "PedMasks" / "Ped00004_mask.png").unlink()
    return "Ped00004.png", "image has no mask"


def _break_missing_image(root):
    (root / "PNGImages" / "Ped00005.png").unlink()
    return "Ped00005_mask.png", "mask has no image"


def _break_unreadable_folder(root):
    for path in (root / "PedMasks").iterdir():
        path.unlink()
    (root / "PedMasks").rmdir()
    (root / "PedMasks").write_text("not a folder")
    return str(root), "not a PennFudan folder"


def _break_colour_mask(root):
    path = root / "PedMasks" / "Ped00001_mask.png"
    Image.open(path).convert("RGB").save(path)
    return path.name, "mask has mode RGB"


BREAKAGES = [
    _break_truncated,
    _break_not_png,
    _break_size_mismatch,
    _break_missing_mask,
    _break_missing_image,
    _break_unreadable_folder,
    _break_colour_mask,
]


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__[len("_break_") :])
def test_bad_input_is_one_line_and_keeps_the_old_cache(small_folder, tmp_path, capsys, breakage, workers):
    out = tmp_path / "cache" / "c.h5"
    cli(cache_main, ["build", "--root", str(small_folder), "--out", str(out)], capsys)
    before = out.read_bytes()
    names, reason = breakage(small_folder)
    status, _stdout, stderr = cli(
        cache_main, ["build", "--root", str(small_folder), "--out", str(out), "--workers", workers], capsys
    )
    assert status == 2
    lines = [line for line in stderr.splitlines() if not line.startswith("build:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert names in lines[0] and reason in lines[0], lines[0]
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.h5"]  # no temporary file left behind


def test_bad_input_from_the_real_command_line_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lean.cache",
            "build",
            "--root",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "c.h5"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"
    assert "Traceback" not in result.stderr and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_failed_build_leaves_the_old_cache_untouched(tmp_path, workers):
    out = tmp_path / "c.h5"
    build(SyntheticSource(6, 0), out, workers=0, progress=False)
    before = out.read_bytes()
    examples = [synthesize(1, i) for i in range(6)]
    with pytest.raises(LeanError, match="ex4: made to fail"):
        build(ArraySource(examples, fail_at=4), out, workers=workers, progress=False)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


def test_ctrl_c_during_a_build_leaves_the_old_cache_untouched(tmp_path):
    out = tmp_path / "c.h5"
    build(SyntheticSource(3, 0), out, workers=0, progress=False)
    before = out.read_bytes()
    command = [sys.executable, "-m", "lean.cache", "build", "--source", "synthetic", "--num-images", "5000"]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=foreground_ctrl_c,
    )
    assert wait_for(build_writing(tmp_path, out.name))  # well into decoding
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100), "not a readable HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a lean cache"),
        (lambda p: p.write_text("hello"), "not a readable HDF5 file"),
    ],
    ids=["truncated", "corrupt", "foreign-hdf5", "text"],
)
def test_damaged_or_foreign_cache_is_refused_in_one_line(tmp_path, capsys, damage, reason):
    path = build(SyntheticSource(8, 0), tmp_path / "c.h5", workers=0, progress=False)
    damage(path)
    for command in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, command, capsys)
        assert status == 2 and reason in stderr and str(path) in stderr and len(stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["build", "--workers", "-1"], "--workers: must be 0 or more"),
        (["build", "--source", "synthetic", "--num-images", "0"], "--num-images: must be at least 1"),
        (["build", "--source", "synthetic", "--root", "x"], "--root: applies to --source pennfudan only"),
        (["build", "--source", "imagenet"], "invalid choice"),
        (["build", "--source", "synthetic", "--classes", "3", "--rare", "0"], "--rare: must be at least 1"),
        (["build", "--source", "synthetic", "--rare", "10"], "--rare: applies to --source synthetic with --classes"),
        (["info"], "the following arguments are required"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, reason):
    status, _, stderr = cli(cache_main, argv, capsys)
    assert status == 2 and reason in stderr and len(stderr.splitlines()) == 1


class DyingSource(ArraySource):
    def load(self, i, encoded=False):
        if i == self.fail_at:
            os._exit(1)  # as the kernel's out-of-memory killer would end it
        return super().load(i, encoded)


def test_a_worker_that_dies_fails_the_build_instead_of_hanging_it(tmp_path):
    examples = [synthesize(1, i) for i in range(6)]
    with pytest.raises(LeanError, match="worker process died"):
        build(DyingSource(examples, fail_at=3), tmp_path / "c.h5", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


class MisreportingSource(ArraySource):
    def sizes(self):
        sizes = super().sizes()
        sizes[1, 1] += 1  # a header that does not match the pixels it heads
        return sizes


def test_an_image_whose_pixels_differ_from_its_header_fails_the_build_naming_both_sizes(tmp_path):
    examples = [synthesize(1, i) for i in range(3)]
    height, width = examples[1][0].shape[:2]
    message = f"ex1: decoded size {(height, width)} differs from its header {(height, width + 1)}"
    with pytest.raises(LeanError, match=re.escape(message)):
        build(MisreportingSource(examples), tmp_path / "c.h5", workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_encoded_pixels_hold_the_files_and_give_the_same_images_and_targets(small_folder, tmp_path):
    source = PennFudanSource(small_folder)
    raw = Cache(build(source, tmp_path / "raw.h5", workers=0, progress=False, pixels="raw"))
    encoded = Cache(build(source, tmp_path / "encoded.h5", workers=2, progress=False, pixels="encoded"))
    assert raw.stored == "raw" and encoded.stored == "encoded" and raw.fingerprint == encoded.fingerprint
    for i, (_, image_path, _) in enumerate(source.pairs):
        assert bytes(encoded.encoded(i)) == image_path.read_bytes()
        assert np.array_equal(encoded.image(i), raw.image(i))
        for key, value in raw.target(i).items():
            assert torch.equal(encoded.target(i)[key], value), key
    assert os.path.getsize(tmp_path / "encoded.h5") < os.path.getsize(tmp_path / "raw.h5")


def test_pixels_are_stored_raw_under_two_gib_and_encoded_above():
    from lean.cache.writer import default_pixels

    assert default_pixels(np.array([[1000, 1000]] * 700)) == "raw"  # 2.1 GB... of 3-byte pixels: 1.96 GiB
    assert default_pixels(np.array([[3000, 4000]] * 100)) == "encoded"  # 100 12-megapixel photos: 3.4 GiB


def _flip_byte(path, dataset, index=0):
    with h5py.File(path, "r+") as handle:
        data = handle[dataset][...]
        flat = data.reshape(-1).view(np.uint8)
        flat[index] ^= 0xFF
        handle[dataset][...] = data


@pytest.mark.parametrize("dataset", ["sizes", "pixel_offsets", "instance_offsets", "mask_offsets", "mask_crops"])
def test_a_cache_with_flipped_index_bytes_is_refused_in_one_line(tiny, tmp_path, dataset, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    _flip_byte(path, dataset, index=8 if dataset.endswith("offsets") else 0)
    for argv in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, argv, capsys)
        assert one_line(status, stderr, "damaged cache"), stderr
    status, _, stderr = cli(train_main, ["--cache", str(path), *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert one_line(status, stderr, "damaged cache") and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "attribute, value, reason",
    [
        ("classes", "not json", "attribute classes"),
        ("classes", "5", "attribute classes"),
        ("params", "{", "attribute params"),
        ("skipped", "[1]", "attribute skipped"),
        ("category_ids", "[1, 2, 3, 4, 5, 6, 7]", "classes"),
        ("box_end", "sideways", "box end"),
    ],
)
def test_a_cache_with_a_damaged_attribute_is_refused_in_one_line(tiny, tmp_path, attribute, value, reason, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        handle.attrs[attribute] = value
    for argv in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, argv, capsys)
        assert one_line(status, stderr, f"damaged cache ({reason})"), stderr


def _replace(name, data=None, group=False):
    def damage(handle):
        del handle[name]
        if group:
            handle.create_group(name)
        else:
            handle.create_dataset(name, data=data)

    return damage


def _drop_attribute(name):
    return lambda handle: handle.attrs.__delitem__(name)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda h: _replace("pixels", h["pixels"][...].astype(np.uint16))(h), "pixels is uint16"),
        (lambda h: _replace("mask_bits", h["mask_bits"][...].astype(np.int32))(h), "mask_bits is int32"),
        (lambda h: _replace("labels", h["labels"][...].astype(np.float64))(h), "labels is float64"),
        (lambda h: _replace("sizes", h["sizes"][...].astype(np.float32))(h), "sizes is float32"),
        (lambda h: _replace("boxes", h["boxes"][...].reshape(-1))(h), "boxes is float32"),
        (lambda h: _replace("labels", group=True)(h), "labels is not a dataset"),
        (lambda h: h["iscrowd"].write_direct(np.full(h["iscrowd"].shape, 7, np.int64)), "iscrowd"),
        (_drop_attribute("fingerprint"), "attribute fingerprint"),
        (_drop_attribute("pixels"), "attribute pixels"),
        (_drop_attribute("box_end"), "attribute box_end"),
    ],
    ids=[
        "pixels-uint16",
        "bits-int32",
        "labels-float",
        "sizes-float",
        "boxes-flat",
        "labels-group",
        "iscrowd-7",
        "no-fingerprint",
        "no-pixels",
        "no-box-end",
    ],
)
def test_a_cache_whose_datasets_or_attributes_are_of_the_wrong_kind_is_one_line_everywhere(
    tiny, tmp_path, damage, reason, capsys
):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        damage(handle)
    for argv in (["info", str(path)], ["verify", str(path)]):
        status, _, stderr = cli(cache_main, argv, capsys)
        assert one_line(status, stderr, "damaged cache", reason), stderr
    status, _, stderr = cli(train_main, ["--cache", str(path), *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert one_line(status, stderr, "damaged cache", reason) and not (tmp_path / "r").exists()


def test_flipped_pixel_bytes_are_found_by_their_checksum_without_the_source(tiny, tmp_path, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        pixels = handle["pixels"][...]
        pixels.reshape(-1)[1000] ^= 0x40
        handle["pixels"][...] = pixels
    status, stdout, _ = cli(cache_main, ["verify", str(path)], capsys)
    assert status == 1 and "MISMATCH" in stdout and "checksum" in stdout


# --- one line where there were tracebacks ------------------------------------------------------------


def test_a_build_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("lean.cache.writer.h5py.File", read_only)
    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    status, _, stderr = cli(
        cache_main, ["build", "--source", "synthetic", "--num-images", "2", "--out", str(tmp_path / "c.h5")], capsys
    )
    assert one_line(status, stderr, "Read-only file system"), stderr


def _build_command(out, count=3000):
    return [sys.executable, "-m", "lean.cache", "build", "--source", "synthetic", "--num-images", str(count),
            "--workers", "2", "--out", str(out)]  # fmt: skip


def _processes_writing(path):
    """PIDs whose command line names `path` (the build and its forked workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if str(path).encode() in cmdline.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_build_leaves_no_workers_and_its_temporary_is_cleared(tmp_path, how):
    out = tmp_path / "c.h5"
    process = subprocess.Popen(_build_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(build_writing(tmp_path, out.name))
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert wait_for(lambda: not _processes_writing(out), timeout=20)  # the workers died with their parent
    if how == signal.SIGTERM:
        assert not list(tmp_path.glob(".c.h5.*.tmp"))
    else:  # a SIGKILLed build cannot clean up: the next one does
        assert list(tmp_path.glob(".c.h5.*.tmp"))
        subprocess.run(_build_command(out, count=2), check=True, capture_output=True, timeout=120)
        assert not list(tmp_path.glob(".c.h5.*.tmp")) and out.is_file()


def test_a_build_never_writes_over_its_own_inputs_or_a_file_that_is_not_a_cache(tmp_path, capsys):
    from tests.coco_files import annotation, dataset, write_coco

    annotations = write_coco(tmp_path / "d", dataset([annotation(1)]))
    inputs = {path: path.read_bytes() for path in (annotations, tmp_path / "d" / "a.png")}
    foreign = tmp_path / "notes.h5"
    with h5py.File(foreign, "w") as handle:
        handle["mine"] = np.arange(3)
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    command = ["build", "--source", "coco", "--annotations", str(annotations), "--workers", "0", "--out"]
    for out, reason in [*((path, "is one of this command's inputs") for path in inputs),
                        (foreign, "did not write"), (text, "did not write")]:  # fmt: skip
        status, _, stderr = cli(cache_main, [*command, str(out)], capsys)
        assert one_line(status, stderr, str(out), reason), stderr
    assert {path: path.read_bytes() for path in inputs} == inputs and text.read_text() == "mine"
    with h5py.File(foreign) as handle:
        assert list(handle) == ["mine"]
    cache = tmp_path / "c.h5"
    for _ in range(2):  # a cache is rebuilt in place
        assert cli(cache_main, [*command, str(cache)], capsys)[0] == 0


def test_a_cache_version_of_another_kind_is_named_as_it_is(tiny, tmp_path, capsys):
    path = tmp_path / "c.h5"
    path.write_bytes(tiny.read_bytes())
    with h5py.File(path, "r+") as handle:
        handle.attrs["version"] = "2"
    status, _, stderr = cli(cache_main, ["info", str(path)], capsys)
    assert one_line(status, stderr, "cache format version '2', this lean reads 2"), stderr
