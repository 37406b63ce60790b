import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lean.cli import run
from lean.synthetic import synthesize

REAL_DATA = os.environ.get("LEAN_PENNFUDAN")


def write_pennfudan(root, examples):
    """Write (name, RGB image, id map) examples as a PennFudan folder; returns root."""
    root = Path(root)
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    for name, image, id_map in examples:
        Image.fromarray(image).save(root / "PNGImages" / f"{name}.png")
        Image.fromarray(id_map).save(root / "PedMasks" / f"{name}_mask.png")
    return root


@pytest.fixture
def small_folder(tmp_path):
    """Six synthetic examples written as PNG files, PennFudan style."""
    examples = [(f"Ped{i:05d}", *synthesize(7, i)) for i in range(6)]
    return write_pennfudan(tmp_path / "PennFudanPed", examples)


def cli(main, argv, capsys):
    """Run a command's main in-process as its `python -m` entry would; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err
