"""python -m lean.predict IMAGE... --checkpoint PATH: draw what a trained model finds, and print it as JSON.

For each image, DIR/NAME.png shows the detections above --score-thresh
(translucent masks, boxes and scores over the image) and one JSON line on
stdout lists them. An unreadable image is one line on stderr; the others
are still processed, and the exit status says that one failed.
"""

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from lean.checkpoint import load_model
from lean.cli import Parser, run
from lean.errors import LeanError
from lean.images import decode_rgb

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080"]


def read_image(path):
    """3 x H x W uint8 RGB tensor of an image file (lean.images' decoder, as everywhere else)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise LeanError(f"{path}: not a readable image ({error.strerror or error})") from None
    return decode_rgb(data, path)


def keep_confident(prediction, score_thresh):
    keep = prediction["scores"] >= score_thresh
    return {key: value[keep] for key, value in prediction.items()}


def draw(image, prediction, spec):
    """The image with the prediction's masks, boxes, class names and scores drawn over it, a colour a class."""
    colours = [PALETTE[(int(label) - 1) % len(PALETTE)] for label in prediction["labels"]]
    if len(colours):
        image = draw_segmentation_masks(image, prediction["masks"][:, 0] > 0.5, alpha=0.45, colors=colours)
        labels = [
            f"{spec.class_names[int(label) - 1]} {score:.2f}"
            for label, score in zip(prediction["labels"], prediction["scores"])
        ]
        image = draw_bounding_boxes(image, prediction["boxes"], labels=labels, colors=colours, width=2)
    return image


def save_png(image, path):
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(temporary, format="PNG")
    os.replace(temporary, path)


def as_json(path, prediction, spec):
    return json.dumps({
        "image": str(path),
        "detections": [
            {
                "label": spec.class_names[int(label) - 1],
                "category_id": spec.category_ids[int(label) - 1],
                "score": round(float(score), 4),
                "box": [round(v, 1) for v in box.tolist()],
            }
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"])
        ],
    })  # fmt: skip


def parse_args(argv):
    parser = Parser(prog="python -m lean.predict", description=__doc__)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("predictions"))
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    model, spec, _ = load_model(args.checkpoint, device)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except LeanError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        prediction = {key: value.cpu() for key, value in model([image.to(device)])[0].items()}
        prediction = keep_confident(prediction, args.score_thresh)
        save_png(draw(image, prediction, spec), args.out / f"{path.stem}.png")
        print(as_json(path, prediction, spec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
