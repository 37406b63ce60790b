"""lean.predict: pictures and JSON lines of what a checkpoint finds, whatever the images."""

import json

import numpy as np
import torch
from PIL import Image

from lean.predict import label, line_width, read_image
from lean.predict import main as predict_main
from lean.synthetic import SyntheticSource
from tests.conftest import cli


def test_prediction_refuses_a_decompression_bomb_in_one_line_and_goes_on(run_dir, tmp_path, capsys):
    huge = tmp_path / "huge.png"
    Image.new("1", (15000, 15000)).save(huge)  # 225 megapixels, a few KB on disk
    good = tmp_path / "good.png"
    Image.fromarray(SyntheticSource(1, seed=1).load(0).pixels).save(good)
    argv = [
        str(huge),
        str(good),
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1 and "huge.png" in stderr and "megapixels" in stderr and len(stderr.strip().splitlines()) == 1
    assert (tmp_path / "o" / "good.png").is_file() and '"image"' in stdout


def test_predictions_of_images_with_the_same_name_do_not_overwrite_each_other(run_dir, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(SyntheticSource(2, seed=1).load(folder == "b").pixels).save(tmp_path / folder / "same.png")
    images = [str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png")]
    argv = [*images, "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli(predict_main, argv, capsys)[0] == 0
    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == ["same-1.png", "same.png"]


def test_large_images_are_predicted_at_the_models_size_and_drawn_and_reported_at_their_own(run_dir, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.kron(SyntheticSource(1, seed=2).load(0).pixels, np.ones((8, 8, 1), np.uint8))).save(big)
    argv = [str(big), "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--score-thresh", "0"]  # fmt: skip
    status, stdout, _ = cli(predict_main, argv, capsys)
    line = json.loads(stdout)
    width, height = Image.open(big).size
    assert status == 0 and Image.open(tmp_path / "o" / "big.png").size == (width, height)
    boxes = [d["box"] for d in line["detections"]]
    assert boxes and all(box[2] <= width + 1 and box[3] <= height + 1 for box in boxes)
    assert max(box[2] for box in boxes) > 160  # in the photo's pixels, not the model's (--max-size 160)


def test_exif_orientation_is_applied_to_what_is_predicted(tmp_path):
    photo = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a viewer shows it upright, 30 x 40
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo, exif=exif)
    assert tuple(read_image(photo).shape) == (3, 40, 30)


def test_predictions_are_named_and_coloured_by_class(trained, tmp_path, capsys):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(SyntheticSource(1, seed=5, classes=3).load(0).pixels).save(image)
    argv = [str(image), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--score-thresh", "0"]
    status, stdout, _ = cli(predict_main, [*argv, "--device", "cpu"], capsys)
    detections_ = json.loads(stdout)["detections"]
    assert status == 0 and detections_
    names = {"person": 1, "disc": 2, "triangle": 3}
    assert all(names[d["label"]] == d["category_id"] for d in detections_)


def test_predict_draws_each_image_and_reports_the_unreadable_one(trained_run, small_folder, tmp_path, capsys):
    _, run_dir = trained_run
    good = sorted((small_folder / "PNGImages").iterdir())[:2]
    jpeg = tmp_path / "photo.jpg"
    Image.open(good[0]).convert("RGB").save(jpeg)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [
        str(good[0]),
        str(broken),
        str(good[1]),
        str(jpeg),
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--out",
        str(tmp_path / "out"),
        *"--score-thresh 0.0 --device cpu".split(),
    ]
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1
    assert (
        stderr.strip().startswith(f"error: {broken}: not a readable image (") and len(stderr.strip().splitlines()) == 1
    )
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(good[0]), str(good[1]), str(jpeg)]
    for path in (good[0], good[1], jpeg):
        drawn = Image.open(tmp_path / "out" / f"{path.stem}.png")
        assert drawn.size == Image.open(path).size and drawn.mode == "RGB"
    assert all(set(d) == {"label", "category_id", "score", "box"} for line in lines for d in line["detections"])


def test_labels_and_lines_grow_with_the_picture():
    sizes = []
    for side in (150, 3000):
        image = torch.zeros(3, side, side, dtype=torch.uint8)
        boxes = torch.tensor([[side * 0.3, side * 0.3, side * 0.6, side * 0.6]])
        drawn = label(image, boxes, ["person 0.99"], ["#e6194b"])
        band = (drawn[0] == 0xE6) & (drawn[1] == 0x19) & (drawn[2] == 0x4B)  # the label's background
        rows = np.flatnonzero(band.any(dim=1).numpy())
        sizes.append((rows[-1] - rows[0] + 1, line_width(image)))
    (small_band, small_line), (large_band, large_line) = sizes
    assert small_band >= 12 and large_band >= 3 * small_band and large_band >= 0.015 * 3000  # readable at either size
    assert small_line >= 2 and large_line >= 0.002 * 3000


def test_predictions_never_draw_over_their_inputs_or_pictures_they_did_not_draw(run_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, kind in (("holiday.jpg", "JPEG"), ("holiday.png", "PNG"), ("snap.png", "PNG")):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / name, kind)
    before = {path: path.read_bytes() for path in folder.iterdir()}
    argv = [str(folder / "holiday.jpg"), str(folder / "snap.png"), "--checkpoint", str(run_dir / "last.pt"),
            "--out", str(folder), "--device", "cpu"]  # fmt: skip
    for _ in range(2):  # the second run draws over its own pictures, not beside them
        status, stdout, _ = cli(predict_main, argv, capsys)
        assert status == 0
        pictures = [json.loads(line)["picture"] for line in stdout.splitlines()]
        assert pictures == [str(folder / "holiday-1.png"), str(folder / "snap-1.png")]
        assert all(path.read_bytes() == data for path, data in before.items())
        assert sorted(path.name for path in folder.iterdir()) == [
            "holiday-1.png", "holiday.jpg", "holiday.png", "snap-1.png", "snap.png"
        ]  # fmt: skip


def test_an_image_too_thin_for_the_models_sizes_is_one_line_and_the_rest_are_drawn(run_dir, tmp_path, capsys):
    Image.fromarray(np.zeros((1000, 3, 3), np.uint8)).save(tmp_path / "thin.png")
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "fine.png")
    argv = [str(tmp_path / "thin.png"), str(tmp_path / "fine.png"), "--checkpoint", str(run_dir / "last.pt"),
            "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1 and "thin.png" in stderr and "too thin" in stderr and len(stderr.strip().splitlines()) == 1
    assert (tmp_path / "out" / "fine.png").is_file() and len(stdout.splitlines()) == 1


def test_an_animation_is_one_line_and_the_rest_are_drawn(run_dir, tmp_path, capsys):
    frames = [Image.fromarray(np.full((40, 50, 3), 80 * k, np.uint8)) for k in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.png")
    argv = [str(tmp_path / "moving.gif"), str(tmp_path / "still.png"), "--checkpoint", str(run_dir / "last.pt"),
            "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    status, stdout, stderr = cli(predict_main, argv, capsys)
    assert status == 1 and "moving.gif: an animation (3 frames)" in stderr and len(stderr.strip().splitlines()) == 1
    assert (tmp_path / "out" / "still.png").is_file() and len(stdout.splitlines()) == 1
