"""python -m lean.predict IMAGE|FOLDER|PATTERN... --checkpoint PATH: draw what a trained model finds, and print
it as JSON. With --model FILE instead, the model lean.export wrote to FILE (ONNX or TorchScript) does the same.

Each argument is an image, a folder (its images) or a glob pattern ("photos/**/*.jpg"). For each image,
DIR/NAME.png shows the detections above --score-thresh (boxes, class names and scores over the image, and
a Mask R-CNN's translucent masks) and one JSON line on stdout lists them and names the picture: NAME-1.png
where NAME.png is an input or a file lean.predict did not draw, which it never draws over. An unreadable
image is one line on stderr; the others are still processed, and the exit status says that one failed.
More than a handful of images get a progress line on stderr.
"""

import argparse
import glob
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from lean.canvas import too_thin
from lean.checkpoint import load_model
from lean.cli import Parser, add_device_argument, check_device, run
from lean.deployed import load_deployed
from lean.errors import LeanError, reason
from lean.files import distinct, write_atomically
from lean.images import SUFFIXES, decode_rgb, png_marked, read_header
from lean.progress import Progress
from lean.speed import configure_process

HANDFUL = 8  # more images than this get a progress line
MARK = "lean.predict"
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080"]


def read_image(path):
    """3 x H x W uint8 RGB tensor of an image file, turned as its EXIF orientation says: what a viewer shows is
    what is predicted. Images past lean.images.MAX_PIXELS are refused before they are decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise LeanError(f"{path}: not a readable image ({error.strerror or reason(error)})") from None
    read_header(io.BytesIO(data), name=path)
    return decode_rgb(data, path, orient=True)


def fit(image, spec):
    """(the image at the size the model works at, if that is smaller, and the scale it was shrunk by). The model
    would shrink it anyway; shrunk first, its masks come out at this size, not at the original one (at
    8000 x 8000 px, 100 of them took more than 24 GB)."""
    height, width = image.shape[-2:]
    scale = min(spec.min_size / min(height, width), spec.max_size / max(height, width))
    if scale >= 1:
        return image, 1.0
    size = (round(height * scale), round(width * scale))
    resized = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8), scale


def output_names(paths, out):
    """A PNG name in `out` for each input: NAME.png, or NAME-1.png... where two inputs share a name (a/x.png,
    b/x.png) or where NAME.png is an input or a file lean.predict did not draw: it never draws over them."""
    inputs = {path.resolve() for path in paths}

    def taken(name):
        target = out / name
        return target.resolve() in inputs or (target.exists() and not drawn_here(target))

    return distinct([f"{path.stem}.png" for path in paths], taken)


def drawn_here(path):
    """Whether the file at `path` is a picture lean.predict drew (they carry its mark)."""
    return png_marked(path, MARK)


def keep_confident(prediction, score_thresh):
    keep = prediction["scores"] >= score_thresh
    return {key: value[keep] for key, value in prediction.items()}


def draw(image, prediction, spec, scale=1.0):
    """The image with the prediction's masks, boxes, class names and scores drawn over it, a colour a class.

    `prediction` is for the image shrunk by `scale` (fit): its masks are brought to the image's size one at
    a time, so a large photo never holds all of them at full size at once.
    """
    colours = [PALETTE[(int(label) - 1) % len(PALETTE)] for label in prediction["labels"]]
    if not colours:
        return image
    if "masks" in prediction:  # a Faster R-CNN's predictions are boxes alone
        image = draw_masks(image, prediction["masks"], colours, scale)
    names = [
        f"{spec.class_names[int(label) - 1]} {score:.2f}"
        for label, score in zip(prediction["labels"], prediction["scores"])
    ]
    boxes = prediction["boxes"] / scale
    image = draw_bounding_boxes(image, boxes, colors=colours, width=line_width(image))
    return label(image, boxes, names, colours)


def draw_masks(image, masks, colours, scale=1.0):
    """The image with each of `masks` (N x 1 x h x w scores, for the image shrunk by `scale`) laid over it,
    translucent; brought to the image's size one at a time, so a large photo never holds all at once."""
    if scale == 1.0:
        return draw_segmentation_masks(image, masks[:, 0] > 0.5, alpha=0.45, colors=colours)
    for mask, colour in zip(masks, colours):
        mask = torch.nn.functional.interpolate(mask[None], size=image.shape[-2:], mode="bilinear")[0, 0]
        image = draw_segmentation_masks(image, mask > 0.5, alpha=0.45, colors=[colour])
    return image


def line_width(image):
    """Box lines thick enough to see at the picture's own size: 2 px on a small image, more on a large photo."""
    return max(2, round(max(image.shape[-2:]) / 400))


def label(image, boxes, names, colours):
    """`names` written above their boxes on a band of their colour, in a font scaled to the picture (torchvision's
    labels come in a fixed bitmap font that a 12-megapixel photo shrinks to nothing)."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, round(max(picture.size) / 50)))
    for (x0, y0, _, _), name, colour in zip(boxes.tolist(), names, colours):
        anchor = "ld"  # above the box, on its left corner
        if draw.textbbox((x0, y0), name, font=font, anchor=anchor)[1] < 0:
            anchor = "la"  # no room above: inside
        left, top, right, bottom = draw.textbbox((x0, y0), name, font=font, anchor=anchor)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        draw.text((x0, y0), name, fill="white", font=font, anchor=anchor)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def save_png(image, path):
    """Write the picture as a PNG marked as lean.predict's (drawn_here), atomically."""
    mark = PngInfo()
    mark.add_text("Software", MARK)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    write_atomically(path, lambda temporary: picture.save(temporary, "PNG", pnginfo=mark))


def as_json(path, picture, prediction, spec, scale=1.0):
    """One JSON line: the image, its picture, and each detection's class, score and box in the image's pixels."""
    return json.dumps({
        "image": str(path),
        "picture": str(picture),
        "detections": [
            {
                "label": spec.class_names[int(label) - 1],
                "category_id": spec.category_ids[int(label) - 1],
                "score": round(float(score), 4),
                "box": [round(v / scale, 1) for v in box.tolist()],
            }
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"])
        ],
    })  # fmt: skip


def expand(inputs):
    """The image files that `inputs` name: a file as given, a folder's images (sorted), a pattern's matches."""
    paths = []
    for item in inputs:
        if item.is_dir():
            found = sorted(path for path in item.iterdir() if path.suffix.lower() in SUFFIXES and path.is_file())
            if not found:
                raise LeanError(f"{item}: a folder with no images in it")
        elif not item.exists() and any(char in str(item) for char in "*?["):
            found = sorted(Path(match) for match in glob.glob(str(item), recursive=True) if Path(match).is_file())
            if not found:
                raise LeanError(f"{item}: no file matches")
        else:
            found = [item]
        paths += found
    return paths


def parse_args(argv):
    parser = Parser(
        prog="python -m lean.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", type=Path, help="images, folders of images, or glob patterns")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="a lean checkpoint (last.pt, best.pt)")
    model.add_argument("--model", type=Path, help="a file lean.export wrote: FILE.onnx (onnxruntime) or TorchScript")
    parser.add_argument("--out", type=Path, default=Path("predictions"))
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=1, help="images the model takes at once")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if not 0 <= args.score_thresh <= 1:
        parser.error(f"argument --score-thresh: {args.score_thresh} is not between 0 and 1")
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be at least 1, got {args.batch_size}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    return args


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    configure_process()
    paths = expand(args.images)
    device = torch.device(args.device)
    if args.checkpoint:
        model, spec, _ = load_model(args.checkpoint, device)
        model.eval()
    else:
        model = load_deployed(args.model, args.device)
        spec = model.spec
    progress = Progress(len(paths), "predict", rate="images/s") if len(paths) > HANDFUL else None
    failed = 0
    jobs = list(zip(paths, output_names(paths, args.out)))
    for start in range(0, len(jobs), args.batch_size):
        batch = []
        for path, name in jobs[start : start + args.batch_size]:
            try:
                image = read_image(path)
                thin = too_thin(*image.shape[-2:], spec.min_size, spec.max_size)
                if thin:
                    raise LeanError(f"{path}: {thin}")
                batch.append((path, name, image))
            except LeanError as error:
                print(f"error: {error}", file=sys.stderr)
                failed += 1
        shrunk = [fit(image, spec) for _, _, image in batch]
        outputs = model([image.to(device) for image, _ in shrunk]) if batch else []
        for (path, name, image), (_, scale), output in zip(batch, shrunk, outputs):
            prediction = keep_confident({key: value.cpu() for key, value in output.items()}, args.score_thresh)
            args.out.mkdir(parents=True, exist_ok=True)
            save_png(draw(image, prediction, spec, scale), args.out / name)
            print(as_json(path, args.out / name, prediction, spec, scale), flush=True)
        if progress:
            progress.update(len(jobs[start : start + args.batch_size]))
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
