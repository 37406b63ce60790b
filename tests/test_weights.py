"""Weights files are read with nothing but tensors and plain values unpickled, downloads included."""

import os
import re

import pytest
import torch

from lean.checkpoint import read_weights
from lean.errors import LeanError
from lean.model import ModelSpec, create_model
from lean.weights import WeightsUnavailable

RAN = []


def _record_that_it_ran():
    RAN.append(True)
    return {}


class Payload:
    """Pickles as a call of _record_that_it_ran: what a tampered weights file would do, harmlessly."""

    def __reduce__(self):
        return _record_that_it_ran, ()


def test_weights_files_are_read_without_running_what_they_pickle(tmp_path):
    torch.save({"weight": Payload()}, tmp_path / "tampered.pt")
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(LeanError, match=re.escape("tampered.pt: not a loadable weights file (holds more than")) as no:
        read_weights(tmp_path / "tampered.pt")
    assert "weights_only" not in str(no.value)  # torch's advice to load it unsafely is not passed on
    junk = "junk.pt: not a loadable weights file (not a file torch.save writes)"
    with pytest.raises(LeanError, match=re.escape(junk)):
        read_weights(tmp_path / "junk.pt")
    assert RAN == []


def test_a_tampered_file_in_torchs_download_cache_is_refused_not_run(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"weight": Payload()}, cached)  # found there, torch.hub loads it without downloading or hashing it
    spec = ModelSpec("mobilenet_v3_fpn", min_size=128, max_size=224)
    with pytest.raises(WeightsUnavailable, match="ImageNet weights file there holds more than tensors"):
        create_model(spec, download=True)
    assert RAN == [] and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_detect_model_downloads_torchvisions_faster_rcnn_coco_weights(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"weight": Payload()}, cached)  # the file the detect model asks torch.hub for, and no other
    spec = ModelSpec("resnet50_fpn", min_size=128, max_size=224, task="detect")
    with pytest.raises(WeightsUnavailable, match="COCO weights file there holds more than tensors"):
        create_model(spec, download=True)
    assert RAN == []


def test_a_v2_model_downloads_torchvisions_v2_coco_weights(tmp_path, monkeypatch):
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"weight": Payload()}, cached)  # the file the v2 model asks torch.hub for, and no other
    spec = ModelSpec("resnet50_fpn_v2", min_size=128, max_size=224)
    with pytest.raises(WeightsUnavailable, match="COCO weights file there holds more than tensors"):
        create_model(spec, download=True)
    assert RAN == []


def test_v2_weights_fetched_from_a_server_are_checked_against_their_published_hash(tmp_path, monkeypatch, serve):
    """The real download path (torch.hub over HTTP, loopback here) of the Faster R-CNN v2 weights: a file whose
    bytes do not match the hash its name publishes is refused in one line, and nothing is left in the cache."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.save({"not": torch.zeros(1)}, tmp_path / "forged.pth")
    name = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url.rsplit("/", 1)[1]
    monkeypatch.setattr(
        FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.value, "url", serve((tmp_path / "forged.pth").read_bytes(), name)
    )
    with pytest.raises(WeightsUnavailable, match=r"cannot download the COCO weights .*hash"):
        create_model(ModelSpec("resnet50_fpn_v2", min_size=128, max_size=224, task="detect"), download=True)
    assert not (tmp_path / "hub" / "checkpoints" / name).exists()
