"""What a source of examples is (the Source protocol every source follows), and the one function that turns a
cache's recorded params, or a build's arguments put the same way, back into a source.

A source is a list of named examples whose sizes are known before any pixel is decoded (the cache builder
lays out its arrays from them), each loaded as a lean.example.Example. Sources are picklable, so that build
workers can each load their share. lean's sources: lean.pennfudan, lean.coco, lean.synthetic.
"""

from pathlib import Path
from typing import Protocol

import numpy as np

from lean.example import Example

KINDS = ("pennfudan", "coco", "synthetic")


class Source(Protocol):
    kind: str  # the name params() records under "source"
    names: list[str]  # each image's name in the source (its file name, where it has one)
    classes: tuple[str, ...]  # label k is classes[k - 1]
    category_ids: tuple[int, ...]  # each class's id in the source
    box_end: str  # "inclusive" (x1 is the last column covered, the tutorial's) or "exclusive" (x + w, COCO's)
    masks: bool  # whether its instances carry masks, or are boxes alone (a detection dataset)
    skipped: dict[str, int]  # what the source left out, and why, with counts; {} where it keeps everything

    def __len__(self) -> int: ...

    def params(self) -> dict:
        """What the source is and how it was made, JSON-able: open_source(params) makes it again."""

    def source_ids(self) -> list[int]:
        """Each image's id in the source."""

    def sizes(self) -> np.ndarray:
        """(N, 2) int64 (height, width) of every image, from headers: nothing decoded."""

    def files(self) -> list[Path]:
        """Every file the source reads, so that a build never writes over one of them."""

    def encoded_sizes(self) -> np.ndarray:
        """(N,) int64 bytes of every image file, as a cache of encoded pixels stores them."""

    def load(self, i: int, encoded: bool = False) -> Example:
        """Example i: its pixels decoded, or with `encoded` the image file's own bytes, and its instances."""


def open_source(params, root=None, annotations=None, images=None, download=False):
    """The source `params` describes ({"source": kind, ...} as Source.params() records it, or as the build
    command puts its arguments), with its files looked for at `root`, `annotations` and `images` where those
    are given; None where its files are gone. With `download`, a Penn-Fudan source whose folder is not given
    is found as lean.pennfudan.default_root finds it (downloaded if need be)."""
    from lean.coco import CocoSource
    from lean.pennfudan import PennFudanSource, default_root
    from lean.synthetic import SyntheticSource

    kind = params.get("source")
    if kind == "synthetic":
        return SyntheticSource(params["num_images"], params["seed"], params.get("classes", 1),
                               params.get("boxes_only", False), params.get("rare", 1))  # fmt: skip
    if kind == "coco":
        annotations = Path(annotations or params["annotations"])
        folder = images or params.get("images")
        return CocoSource(annotations, folder and Path(folder)) if download or annotations.is_file() else None
    if download:
        return PennFudanSource(default_root(root or params.get("root")))
    root = Path(root or params.get("root", ""))
    return PennFudanSource(root) if root.is_dir() else None
