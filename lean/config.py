"""A training run's settings: each one's type and default in one place, read by the command line and the tests alike."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("cache/pennfudan.h5")


@dataclass(frozen=True)
class TrainConfig:
    """What `python -m lean.train` was asked to do. None means "the default for the device" where a speed
    setting has one (see lean.speed), or "none" for the optional limits."""

    # data
    cache: Path = DEFAULT_CACHE
    val_cache: Path | None = None  # evaluate on all of this cache, not on a split of `cache`
    test_size: int | None = None
    seed: int = 0
    # model
    backbone: str = "resnet50_fpn"
    weights: str = "coco"  # coco, none, or the path of a state dict or lean checkpoint
    min_size: int = 800
    max_size: int = 1333
    # schedule
    epochs: int = 10
    max_iters: int | None = None
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float = 0.005
    weight_decay: float = 5e-4
    lr_step_epochs: int = 3
    clip_grad: float | None = None
    # speed
    device: str = "cpu"
    amp: str | None = None
    channels_last: bool | None = None
    compile: str | None = None
    sync_bn: bool = False
    # run
    out: Path | None = None
    resume: bool = False
    no_eval: bool = False
    eval_every: int = 1
    log_every: int = 10

    def to_dict(self):
        """Plain values only (paths as strings), as a checkpoint stores them."""
        return {
            key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values):
        """The config a checkpoint stored; keys this version does not know are ignored, paths come back as paths."""
        known = {field.name: field for field in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in known}
        for key in ("cache", "val_cache", "out"):
            if kept.get(key) is not None:
                kept[key] = Path(kept[key])
        if isinstance(kept.get("compile"), bool):  # checkpoints before the backend choice stored a flag
            kept["compile"] = "inductor" if kept["compile"] else "off"
        return cls(**kept)
