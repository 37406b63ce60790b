"""A training run's settings: each one's type, default and valid range in one place, read by the command line,
checkpoints and the tests alike."""

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from lean.errors import LeanError

DEFAULT_CACHE = Path("cache/pennfudan.h5")
AT_LEAST_ONE = ("epochs", "batch_size", "log_every", "min_size", "max_size", "lr_step_epochs", "eval_every")
AT_LEAST_ONE_IF_GIVEN = ("max_iters", "test_size", "canvas_levels", "patience")
POSITIVE_IF_GIVEN = ("lr", "clip_grad", "repeat_factor")
AUGMENTS = ("hflip", "multiscale", "lsj")  # lean.augment


class SettingError(LeanError):
    """A setting out of its range: `field` names it, `problem` says what is wrong, as the command line words it
    after the flag's name."""

    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


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
    task: str | None = None  # segment (Mask R-CNN) or detect (Faster R-CNN); None: segment
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
    patience: int | None = None  # stop after this many evaluations without a better main AP
    ema: float | None = None  # decay of the weights' moving average, evaluated and saved as the model
    repeat_factor: float | None = None  # LVIS repeat-factor sampling's threshold: rare classes' images repeated
    augment: str = "hflip"  # lean.augment's preset
    color_jitter: bool = False
    # speed
    device: str = "cpu"
    amp: str | None = None
    channels_last: bool | None = None
    compile: str | None = None
    canvas_levels: int | None = None  # side lengths per axis batches are padded to; None: lean.canvas's
    batched_heads: bool | None = None  # lean.heads, or torchvision's heads image by image; None: by device
    sync_bn: bool = False
    # run
    out: Path | None = None
    resume: bool = False
    no_eval: bool = False
    eval_every: int = 1
    log_every: int = 10
    tensorboard: bool = False  # the records as TensorBoard event files too, in OUT/tensorboard

    def __post_init__(self):
        check_types(self)
        for field in AT_LEAST_ONE + AT_LEAST_ONE_IF_GIVEN:
            value = getattr(self, field)
            if (value is not None or field in AT_LEAST_ONE) and value < 1:
                raise SettingError(field, "must be at least 1")
        if self.seed < 0:
            raise SettingError("seed", "must not be negative")
        for field in POSITIVE_IF_GIVEN:
            value = getattr(self, field)
            if value is not None and not 0 < value < math.inf:  # nan fails it too
                raise SettingError(field, f"must be a positive number, not {value}")
        if not 0 <= self.weight_decay < math.inf:
            raise SettingError("weight_decay", f"must be a number, not negative, not {self.weight_decay}")
        if self.min_size > self.max_size:
            raise SettingError("min_size", f"{self.min_size} is more than --max-size {self.max_size}")
        if self.augment not in AUGMENTS:
            raise SettingError("augment", f"unknown preset {self.augment!r}; lean has {', '.join(AUGMENTS)}")
        if self.ema is not None and not 0 < self.ema < 1:  # nan fails it too
            raise SettingError("ema", f"must be between 0 and 1 (a decay such as 0.999), not {self.ema}")
        if self.patience is not None and self.no_eval:
            raise SettingError("patience", "counts evaluations, and --no-eval leaves none")
        if self.device == "cpu" and self.amp == "fp16":
            raise SettingError("amp", "fp16 is for CUDA; use bf16 or off on the CPU")
        if self.device == "cpu" and self.compile in ("cudagraphs", "graphs"):
            raise SettingError("compile", f"{self.compile} is for CUDA; use inductor on the CPU")

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


def check_types(settings):
    """SettingError where a field of the dataclass `settings` holds a value its annotation does not admit (as a
    damaged checkpoint may give): the range checks compare values of the right kind."""
    for field in dataclasses.fields(settings):
        value, kinds = getattr(settings, field.name), _kinds(field.type)
        if not isinstance(value, kinds):
            raise SettingError(field.name, f"is {value!r}, not {' or '.join(kind.__name__ for kind in kinds)}")


def _kinds(annotation):
    """The classes a dataclass field's annotation admits (int where it says float, tuple where tuple[str, ...])."""
    members = (annotation,) if typing.get_origin(annotation) is tuple else typing.get_args(annotation) or (annotation,)
    kinds = tuple(typing.get_origin(kind) or kind for kind in members)
    return (*kinds, int) if float in kinds else kinds
