"""COCO files as annotation tools write them: masks exactly as pycocotools' annToMask, the tools' quirks taken,
every kind of bad input one line naming the file and the place in it."""

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from lean.cache import Cache, build
from lean.cache.command import main as cache_main
from lean.coco import SKIP_EMPTY_MASK, SKIP_FEW_POINTS, SKIP_NO_BOX, CocoSource
from lean.errors import LeanError
from tests.coco_files import annotation, dataset, polygon, write_coco
from tests.conftest import cli


def cache_of(tmp_path, data, **kwargs):
    path = write_coco(tmp_path / "d", data, **kwargs)
    return Cache(build(CocoSource(path), tmp_path / "c.h5", workers=0, progress=False)), path


# --- rasterisation: exactly pycocotools' annToMask ---------------------------------------------------


@st.composite
def segmentations(draw, height, width):
    kind = draw(st.sampled_from(["polygons", "rle", "compressed"]))
    if kind == "polygons":
        coordinate = st.floats(-5, max(height, width) + 5, allow_nan=False, width=32)
        rings = draw(st.lists(st.lists(coordinate, min_size=6, max_size=16).filter(lambda r: len(r) % 2 == 0),
                              min_size=1, max_size=3))  # fmt: skip
        return rings
    mask = draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    mask = np.asfortranarray(np.array(mask, dtype=np.uint8).reshape(height, width))
    if not mask.any():
        mask[0, 0] = 1
    rle = mask_util.encode(mask)
    if kind == "compressed":
        return {"size": [height, width], "counts": rle["counts"].decode()}
    runs, flat, value, count = [], mask.flatten(order="F"), 0, 0
    for pixel in flat:  # the uncompressed form: run lengths, starting with zeros
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    return {"size": [height, width], "counts": [*runs, count]}


@st.composite
def coco_cases(draw):
    height, width = draw(st.integers(4, 24)), draw(st.integers(4, 24))
    annotations = [
        annotation(k, segmentation=draw(segmentations(height, width)), bbox=[0, 0, width, height])
        for k in range(1, draw(st.integers(1, 4)) + 1)
    ]
    return dataset(annotations, images=[{"id": 7, "file_name": "a.png", "width": width, "height": height}])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(coco_cases())
def test_masks_are_pycocotools_annToMask(tmp_path_factory, data):
    for item in data["annotations"]:
        item["image_id"] = 7
    tmp_path = tmp_path_factory.mktemp("coco")
    path = write_coco(tmp_path / "d", data)
    source = CocoSource(path)
    reference = COCO(str(path))
    kept = [a for a in data["annotations"] if mask_util.area(reference.annToRLE(a)) > 0]
    cache = Cache(build(source, tmp_path / "c.h5", workers=0, progress=False))
    masks = cache.masks(0)
    assert len(masks) == len(kept) and sum(source.skipped.values()) == len(data["annotations"]) - len(kept)
    for mask, item in zip(masks, kept):
        assert np.array_equal(mask, reference.annToMask(item))


# --- what the tools write --------------------------------------------------------------------------


def test_the_targets_are_the_references_conversion(tmp_path):
    data = dataset(
        [
            annotation(1, segmentation=[polygon(2, 3, 10, 6)], bbox=[2, 3, 10, 6], area=55.5),
            annotation(2, category_id=2, segmentation=[polygon(30, 20, 20, 20)], bbox=[30, 20, 20, 20]),  # cut off
            annotation(3, segmentation=[polygon(0, 0, 40, 30)], bbox=[0, 0, 40, 30], iscrowd=1, area=1200),
        ]
    )  # fmt: skip  (the second has no area: from the mask, then)
    cache, path = cache_of(tmp_path, data)
    target = cache.target(0)
    assert target["boxes"].tolist() == [[2, 3, 12, 9], [30, 20, 40, 30], [0, 0, 40, 30]]
    assert target["labels"].tolist() == [1, 2, 1] and target["iscrowd"].tolist() == [0, 0, 1]
    in_image = int(COCO(str(path)).annToMask(data["annotations"][1]).sum())
    assert target["area"].tolist() == [55.5, in_image, 1200]
    assert cache.classes == ("cat", "dog") and cache.category_ids == (1, 2) and cache.box_end == "exclusive"
    assert cache.names == ["a.png"] and cache.source_ids.tolist() == [1]


def test_roboflow_style_files_are_taken_as_they_come(tmp_path):
    categories = [  # any order, ids not contiguous, an unused placeholder that is the supercategory of the rest
        {"id": 7, "name": "dog", "supercategory": "animals"},
        {"id": 0, "name": "animals", "supercategory": "none"},
        {"id": 3, "name": "cat", "supercategory": "animals"},
    ]
    images = [
        {"id": 100, "file_name": "train/x.jpg", "width": "40", "height": 30},  # numbers as strings
        {"id": 205, "file_name": "train/sub/y.jpg", "width": 40, "height": 30},
        {"id": 101, "file_name": "train/empty.jpg", "width": 40, "height": 30},  # a negative: no annotations
    ]
    data = dataset([
        annotation(1, image_id=205, category_id=7, bbox=["5", "5", "10", "8.0"]),
        annotation(2, image_id=100, category_id=3),
    ], images=images, categories=categories)  # fmt: skip
    cache, _ = cache_of(tmp_path, data, image_format="JPEG")
    assert cache.classes == ("cat", "dog") and cache.category_ids == (3, 7)  # labels in id order, placeholder left out
    assert cache.names == ["train/x.jpg", "train/sub/y.jpg", "train/empty.jpg"]
    assert cache.source_ids.tolist() == [100, 205, 101]
    assert cache.target(1)["labels"].tolist() == [2] and cache.target(0)["labels"].tolist() == [1]
    assert cache.target(1)["boxes"].tolist() == [[5, 5, 15, 13]]
    assert len(cache.target(2)["boxes"]) == 0 and cache.target(2)["masks"].shape == (0, 30, 40)
    assert any("placeholder category 0 'animals'" in why for why in cache.skipped)


def test_two_files_with_the_same_categories_get_the_same_labels(tmp_path):
    categories = [{"id": 9, "name": "b"}, {"id": 2, "name": "a"}, {"id": 5, "name": "c"}]
    train = dataset([annotation(1, category_id=5)], categories=categories)
    valid = dataset([annotation(1, category_id=9), annotation(2, category_id=2)], categories=list(reversed(categories)))
    train_cache, _ = cache_of(tmp_path / "train", train)
    valid_cache, _ = cache_of(tmp_path / "valid", valid)
    assert train_cache.classes == valid_cache.classes == ("a", "c", "b")
    assert train_cache.target(0)["labels"].tolist() == [2] and valid_cache.target(0)["labels"].tolist() == [3, 1]


def test_what_cannot_be_trained_on_is_skipped_and_counted(tmp_path, capsys):
    data = dataset([
        annotation(1),
        annotation(2, segmentation=[[1, 1, 5, 5]]),  # two points
        annotation(3, segmentation={"size": [30, 40], "counts": [1200]}),  # an empty mask
        annotation(4, segmentation=[polygon(5, 5, 4, 4)], bbox=[50, 40, 5, 5]),  # its box outside the image
        annotation(5, segmentation=[[1, 1, 5, 5], polygon(20, 10, 4, 4)]),  # one good ring is enough
    ])  # fmt: skip
    path = write_coco(tmp_path / "d", data)
    status, stdout, _ = cli(
        cache_main, ["build", "--source", "coco", "--annotations", str(path), "--out", str(tmp_path / "c.h5")], capsys
    )
    assert status == 0 and "skipped 1 annotations whose polygons" in stdout
    cache = Cache(tmp_path / "c.h5")
    assert len(cache.target(0)["boxes"]) == 2
    assert cache.skipped == {SKIP_FEW_POINTS: 1, SKIP_EMPTY_MASK: 1, SKIP_NO_BOX: 1}
    status, stdout, _ = cli(cache_main, ["info", str(tmp_path / "c.h5")], capsys)
    assert status == 0 and f"1 {SKIP_EMPTY_MASK}" in stdout and "1 cat (id 1, 2 instances)" in stdout
    status, stdout, _ = cli(cache_main, ["verify", str(tmp_path / "c.h5")], capsys)
    assert status == 0 and stdout.startswith("OK")


def test_encoded_and_raw_caches_of_jpeg_photos_agree(tmp_path):
    data = dataset([annotation(1), annotation(2, category_id=2, segmentation=[polygon(1, 1, 30, 20)])])
    path = write_coco(tmp_path / "d", data, image_format="JPEG")
    raw = Cache(build(CocoSource(path), tmp_path / "raw.h5", workers=0, progress=False, pixels="raw"))
    encoded = Cache(build(CocoSource(path), tmp_path / "enc.h5", workers=0, progress=False, pixels="encoded"))
    assert bytes(encoded.encoded(0)) == (tmp_path / "d" / "a.png").read_bytes()  # a JPEG under a .png name, kept as is
    assert np.array_equal(raw.image(0), encoded.image(0))
    assert all(torch.equal(raw.target(0)[key], value) for key, value in encoded.target(0).items())


# --- bad input: one line naming the file and the place ---------------------------------------------


def _missing_key(data):
    del data["annotations"][0]["image_id"]
    return "annotations[0]: no 'image_id'"


def _unknown_image(data):
    data["annotations"][0]["image_id"] = 42
    return "annotations[0].image_id: no image has id 42"


def _unknown_category(data):
    data["annotations"][0]["category_id"] = 42
    return "annotations[0].category_id: no category has id 42"


def _bad_bbox(data):
    data["annotations"][0]["bbox"] = [1, 2, "wide", 4]
    return "annotations[0].bbox: 'wide' is not a number"


def _bad_rle(data):
    data["annotations"][0]["segmentation"] = {"size": [30, 40], "counts": "not!an\x01rle"}
    return "annotations[0].segmentation.counts: not a compressed RLE"


def _rle_of_another_size(data):
    data["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": [100]}
    return "annotations[0].segmentation.size"


def _odd_polygon(data):
    data["annotations"][0]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]
    return "annotations[0].segmentation[0]: a polygon is a flat list of x, y pairs"


def _stray_polygon_point(data):
    data["annotations"][0]["segmentation"] = [[1, 1, 1e5, 1, 20, 20]]  # 1e30 would take all the memory there is
    return "annotations[0].segmentation[0]: point (100000, 1) lies far outside the 30 x 40 image"


def _escaping_path(data):
    data["images"][0]["file_name"] = "../outside.png"
    return "images[0].file_name: '../outside.png' is outside"


def _no_categories(data):
    del data["categories"]
    return "no 'categories' list"


def _image_id_past_64_bits(data):
    data["images"][0]["id"] = data["annotations"][0]["image_id"] = data["annotations"][1]["image_id"] = 2**64
    return f"images[0].id: {2**64} is past the 64-bit range"


def _negative_area(data):
    data["annotations"][0]["area"] = -5
    return "annotations[0].area: -5 is negative"


def _crowd_as_a_word(data):
    data["annotations"][0]["iscrowd"] = "yes"
    return "annotations[0].iscrowd: 'yes' is not a number"


BAD = [_missing_key, _unknown_image, _unknown_category, _bad_bbox, _bad_rle, _rle_of_another_size, _odd_polygon,
       _stray_polygon_point, _escaping_path, _no_categories, _image_id_past_64_bits, _negative_area,
       _crowd_as_a_word]  # fmt: skip


@pytest.mark.parametrize("breakage", BAD, ids=lambda f: f.__name__[1:])
def test_bad_annotations_are_one_line_naming_the_place(tmp_path, capsys, breakage):
    good = dataset([annotation(1), annotation(2)])
    path = write_coco(tmp_path / "d", good)
    out = tmp_path / "c.h5"
    assert cli(cache_main, ["build", "--source", "coco", "--annotations", str(path), "--out", str(out)], capsys)[0] == 0
    before = out.read_bytes()
    bad = copy.deepcopy(good)
    reason = breakage(bad)
    path.write_text(json.dumps(bad))
    status, _, stderr = cli(
        cache_main, ["build", "--source", "coco", "--annotations", str(path), "--out", str(out)], capsys
    )
    assert status == 2 and reason in stderr and str(path) in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert out.read_bytes() == before  # nothing written on error


def test_json_that_does_not_parse_names_line_and_column(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"images": [],\n  "annotations": [}')
    with pytest.raises(LeanError, match=r"not valid JSON \(line 2, column 19"):
        CocoSource(path)


def test_missing_or_unreadable_images_and_wrong_sizes_name_the_file(tmp_path):
    path = write_coco(tmp_path / "d", dataset([annotation(1)]), sizes={"a.png": (30, 41)})
    with pytest.raises(LeanError, match=r"a.png: is 41x30 but .* gives images\[0\] as 40x30"):
        CocoSource(path).sizes()
    (tmp_path / "d" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(LeanError, match=r"a\.png: not a readable image"):
        CocoSource(path).sizes()
    (tmp_path / "d" / "a.png").unlink()
    with pytest.raises(LeanError, match=r"a.png: no such image file .* images\[0\]"):
        CocoSource(path)
    Image.new("1", (15000, 15000)).save(tmp_path / "d" / "a.png")  # 225 megapixels, a few KB on disk
    with pytest.raises(LeanError, match=r"a\.png: more than the 179 megapixels lean takes in one image"):
        CocoSource(path).sizes()


def test_the_pixel_limit_is_leans_own_where_another_library_lifts_pils(tmp_path, monkeypatch):
    path = write_coco(tmp_path / "d", dataset([annotation(1)]))
    Image.new("1", (15000, 15000)).save(tmp_path / "d" / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(LeanError, match=r"a\.png: more than the 179 megapixels lean takes in one image"):
        CocoSource(path).sizes()


# --- export: any cache out as COCO, and back ---------------------------------------------------------


@pytest.mark.parametrize("which", ["pennfudan", "synthetic_classes", "coco_encoded"])
def test_building_from_an_export_gives_the_same_targets(which, small_folder, tmp_path, capsys):
    from lean.pennfudan import PennFudanSource
    from lean.synthetic import SyntheticSource

    if which == "pennfudan":
        source, pixels = PennFudanSource(small_folder), "raw"
    elif which == "synthetic_classes":
        source, pixels = SyntheticSource(8, seed=4, classes=3), "raw"
    else:
        data = dataset([annotation(1), annotation(2, category_id=2, segmentation=[polygon(1, 1, 30, 20)])])
        source, pixels = CocoSource(write_coco(tmp_path / "d", data, image_format="JPEG")), "encoded"
    original = Cache(build(source, tmp_path / "original.h5", workers=0, progress=False, pixels=pixels))
    status, _, _ = cli(
        cache_main, ["export", str(tmp_path / "original.h5"), "--coco", str(tmp_path / "export")], capsys
    )
    assert status == 0
    assert COCO(str(tmp_path / "export" / "annotations.json")).getImgIds()  # pycocotools reads it
    again = Cache(build(CocoSource(tmp_path / "export" / "annotations.json"), tmp_path / "again.h5", workers=0,
                        progress=False, pixels=pixels))  # fmt: skip
    assert again.classes == original.classes and again.category_ids == original.category_ids
    assert again.source_ids.tolist() == original.source_ids.tolist()
    for i in range(len(original)):
        assert np.array_equal(again.image(i), original.image(i))
        want, got = original.target(i), again.target(i)
        for key in want:
            assert torch.equal(got[key], want[key]), (which, i, key)


def _dataset_folder(tmp_path, names=("a.png", "b.png")):
    images = [{"id": k + 1, "file_name": name, "width": 40, "height": 30} for k, name in enumerate(names)]
    instances = [annotation(k + 1, image_id=k + 1) for k in range(len(names))]
    return write_coco(tmp_path / "dataset", dataset(instances, images))


def _contents(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_export_never_writes_over_a_datasets_own_json_or_images(tmp_path, capsys):
    annotations = _dataset_folder(tmp_path)
    cache = build(CocoSource(annotations), tmp_path / "c.h5", workers=0, progress=False, pixels="encoded")
    before = _contents(annotations.parent)
    status, _, stderr = cli(cache_main, ["export", str(cache), "--coco", str(annotations.parent)], capsys)
    assert status == 2 and "annotations.json that lean did not export" in stderr and len(stderr.splitlines()) == 1
    assert _contents(annotations.parent) == before
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(b"someone's picture")
    status, _, stderr = cli(cache_main, ["export", str(cache), "--coco", str(elsewhere)], capsys)
    assert status == 2 and "b.png is there already" in stderr and len(stderr.splitlines()) == 1
    assert _contents(elsewhere) == {elsewhere / "b.png": b"someone's picture"}
    again = tmp_path / "again"
    for _ in range(2):  # an export's own files may be written again
        assert cli(cache_main, ["export", str(cache), "--coco", str(again)], capsys)[0] == 0


def test_images_that_would_export_to_one_name_keep_one_each_and_the_json_names_both(tmp_path, capsys):
    annotations = _dataset_folder(tmp_path, names=("photo.png", "photo.jpg"))
    cache = build(CocoSource(annotations), tmp_path / "c.h5", workers=0, progress=False, pixels="raw")
    status, stdout, _ = cli(cache_main, ["export", str(cache), "--coco", str(tmp_path / "out")], capsys)
    assert status == 0 and "photo.jpg written as photo-1.png" in stdout
    exported = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [image["file_name"] for image in exported["images"]] == ["photo.png", "photo-1.png"]
    again = Cache(build(CocoSource(tmp_path / "out" / "annotations.json"), tmp_path / "again.h5", workers=0,
                        progress=False))  # fmt: skip
    assert [np.array_equal(again.image(i), Cache(cache).image(i)) for i in range(2)] == [True, True]


def test_a_byte_order_mark_crowds_as_strings_and_shared_category_names_are_read_as_the_tools_mean_them(tmp_path):
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cat"}]
    instances = [annotation(1, iscrowd="1"), annotation(2, category_id=3)]
    path = write_coco(tmp_path / "d", dataset(instances, categories=categories))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Notepad saves UTF-8
    source = CocoSource(path)
    assert source.classes == ("cat (id 1)", "dog", "cat (id 3)")
    assert source.load(0).instances()["iscrowd"].tolist() == [1, 0]


def test_files_that_cannot_be_read_as_still_images_or_json_are_one_line(tmp_path, capsys):
    folder = tmp_path / "d"
    path = write_coco(folder, dataset([annotation(1)]))
    out = str(tmp_path / "c.h5")
    command = ["build", "--source", "coco", "--annotations", str(path), "--workers", "0", "--out", out]
    frames = [Image.fromarray(np.full((30, 40, 3), k * 60, np.uint8)) for k in range(3)]
    cases = {
        "animation": lambda: frames[0].save(folder / "a.png", "GIF", save_all=True, append_images=frames[1:]),
        "TIFF": lambda: frames[0].save(folder / "a.png", "TIFF"),
        "loop": lambda: ((folder / "a.png").unlink(), (folder / "a.png").symlink_to(folder / "a.png")),
        "nested": lambda: path.write_text("[" * 100_000 + "]" * 100_000),
    }
    for what, damage in cases.items():
        damage()
        status, _, stderr = cli(cache_main, command, capsys)
        assert status == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, (what, stderr)
        assert {"animation": "an animation (3 frames)", "TIFF": "a TIFF image", "loop": "a loop of links",
                "nested": "nested too deep"}[what] in stderr, stderr  # fmt: skip


def test_a_dense_image_is_loaded_one_mask_at_a_time(tmp_path):
    import tracemalloc

    count, side = 300, 1000
    images = [{"id": 1, "file_name": "a.png", "width": side, "height": side}]
    instances = [annotation(k + 1, segmentation=[polygon(3 * k, 3 * k, 20, 20)], bbox=[3 * k, 3 * k, 20, 20])
                 for k in range(count)]  # fmt: skip
    source = CocoSource(write_coco(tmp_path / "d", dataset(instances, images)))
    tracemalloc.start()
    try:
        example = source.load(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    crops, _, _ = example.encoded_masks()
    assert len(crops) == count and crops[:, 2:].tolist() == [[20, 20]] * count
    assert peak < 60 * side * side  # all N x H x W masks at once: 300 MB; one at a time: a few images' worth


def test_a_detection_export_builds_a_cache_of_boxes_alone(tmp_path, capsys):
    images = [{"id": k + 1, "file_name": f"{k}.png", "width": 40, "height": 30} for k in range(3)]
    box_only = [annotation(1, image_id=1), annotation(2, image_id=2), annotation(3, image_id=3, bbox=[2, 3, 10, 6])]
    del box_only[0]["segmentation"]  # as CVAT writes a detection export
    box_only[1]["segmentation"] = None
    box_only[2]["segmentation"] = []  # as Roboflow writes it
    path = write_coco(tmp_path / "d", dataset(box_only, images))
    out = tmp_path / "c.h5"
    command = ["build", "--source", "coco", "--annotations", str(path), "--workers", "0", "--out", str(out)]
    status, stdout, _ = cli(cache_main, command, capsys)
    assert status == 0 and "boxes alone" in stdout
    cache = Cache(out)
    assert not cache.has_masks and int(cache.mask_offsets[-1]) == 0 and not cache.mask_crops.any()
    assert cache.instance_targets(2)["boxes"].tolist() == [[2, 3, 12, 9]] and cache.instance_targets(2)["area"] == 60
    assert "none: boxes alone" in cli(cache_main, ["info", str(out)], capsys)[1]
    assert cli(cache_main, ["verify", str(out)], capsys)[0] == 0


def test_a_file_mixing_masks_and_boxes_alone_gives_boxes_alone_and_counts_the_masks_left_out(tmp_path, capsys):
    box_only = annotation(2)
    box_only["segmentation"] = []
    path = write_coco(tmp_path / "d", dataset([annotation(1), box_only, annotation(3)]))
    source = CocoSource(path)
    assert not source.masks
    assert source.skipped == {"masks, as 1 other annotations have none (the cache holds boxes alone: train it with "
                              "--task detect)": 2}  # fmt: skip


def test_an_annotation_with_neither_a_box_nor_a_segmentation_is_one_line(tmp_path):
    bare = annotation(1)
    del bare["segmentation"], bare["bbox"]
    with pytest.raises(LeanError, match=r"annotations\[0\]: neither a bbox nor a segmentation"):
        CocoSource(write_coco(tmp_path / "d", dataset([bare])))


def test_a_cache_of_boxes_alone_exports_without_segmentations_and_builds_the_same_targets(tmp_path, capsys):
    from lean.synthetic import SyntheticSource

    original = Cache(build(SyntheticSource(6, seed=2, boxes_only=True), tmp_path / "o.h5", workers=0, progress=False))
    assert not original.has_masks
    assert cli(cache_main, ["export", original.path, "--coco", str(tmp_path / "export")], capsys)[0] == 0
    exported = json.loads((tmp_path / "export" / "annotations.json").read_text())
    assert exported["annotations"] and not any("segmentation" in a for a in exported["annotations"])
    again = Cache(build(CocoSource(tmp_path / "export" / "annotations.json"), tmp_path / "a.h5", workers=0,
                        progress=False))  # fmt: skip
    assert not again.has_masks
    for i in range(len(original)):
        for field, values in original.instance_targets(i).items():
            assert np.array_equal(again.instance_targets(i)[field], values), field
