"""Mask R-CNN models for lean: the tutorial's two recipes and a small one for CPUs.

    resnet50_fpn      the tutorial's fine-tuning recipe: torchvision's Mask R-CNN
                      with its box and mask predictors replaced for num_classes
    mobilenet_v2      the tutorial's second recipe: MobileNetV2 features as the
                      backbone (1280 channels, one feature map), 5 x 3 anchors
    mobilenet_v3_fpn  MobileNetV3-Large with an FPN: small and fast, for CPUs and tests
    resnet18_fpn      ResNet-18 with a slim FPN and GroupNorm: the one to train from
                      scratch on a CPU (see the README's convergence check)

Every model takes uint8 or float images: lean's transform folds the uint8 to
[0, 1] conversion into its normalisation, so the loader can hand over the
bytes it read. Every model pools its regions with lean.roi_align's
SparseRoIAlign: torchvision's results, several times faster on the CPU. And
every frozen BatchNorm is folded into the convolution before it
(lean.frozen_norm): the same function, one pass over the activations.
"""

import math
import sys
import urllib.error
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lean.errors import LeanError
from lean.frozen_norm import fold_frozen_norms
from lean.roi_align import SparseRoIAlign

BACKBONES = ("resnet50_fpn", "mobilenet_v2", "mobilenet_v3_fpn", "resnet18_fpn")
MASK_HIDDEN = 256
COMPILED_CANVAS_STEP = 64
CANVAS_LEVELS = 4  # side lengths per axis that a compiled backbone's batches are padded to
SMALL_HIDDEN = 128  # channels of mobilenet_v3_fpn's mask head; its box head has 4x this
SLIM_CHANNELS = 64  # resnet18_fpn's FPN and mask head channels; its box head has 4x this


class Uint8Transform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise step, taking uint8 images as well as floats in [0, 1].

    With `channels_last`, the padded batch is laid out channels-last, as the
    convolutions of a channels-last model want it.
    """

    channels_last = False
    canvas_ladder = None  # side lengths to pad batches to, set when the backbone is compiled

    def normalize(self, image):
        if not image.is_floating_point():
            image = image.float().div_(255)
        return super().normalize(image)

    def batch_images(self, images, size_divisible=32):
        if self.canvas_ladder is None:
            batch = super().batch_images(images, size_divisible)
        else:
            batch = pad_to_canvas(images, self.canvas_ladder)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


def canvas_ladder(min_size, max_size, levels=CANVAS_LEVELS, step=COMPILED_CANVAS_STEP):
    """The side lengths a compiled model pads its batches to: `levels` multiples of `step`, min_size's to max_size's.

    The resize puts every short side at min_size (less only where max_size binds) and every long side at
    most at max_size, so a batch padded to the ladder has one of at most levels**2 shapes, in practice
    about one per orientation and level. Each shape is a graph to compile: padding to multiples of 64
    alone gave 20 at the tutorial's 800/1333 on Penn-Fudan, where the ladder gives 832, 1024, 1216, 1344.
    """
    low, high = _round_up(min_size, step), _round_up(max_size, step)
    return tuple(sorted({_round_up(low + (high - low) * k / max(levels - 1, 1), step) for k in range(levels)}))


def canvas_side(needed, ladder, step=COMPILED_CANVAS_STEP):
    """The shortest rung of the ladder that holds `needed` pixels; past the top, the next multiple of `step`."""
    return next((side for side in ladder if side >= needed), _round_up(needed, step))


def pad_to_canvas(images, ladder):
    """Images of one batch (C x H x W each), zero-padded at the bottom and right into one canvas from the ladder."""
    height = canvas_side(max(image.shape[-2] for image in images), ladder)
    width = canvas_side(max(image.shape[-1] for image in images), ladder)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for image, canvas in zip(images, batch):
        canvas[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


def _round_up(length, step):
    return int(math.ceil(length / step) * step)


def build_model(num_classes=2, backbone="resnet50_fpn", weights="coco", min_size=800, max_size=1333):
    """A Mask R-CNN for `num_classes` (background included).

    weights: "coco" (COCO Mask R-CNN weights for resnet50_fpn, ImageNet
    backbone weights for the others), "none" (random init), or a state dict
    or lean checkpoint: in memory, or the path of one.

    Pretrained weights get torchvision's layout for a pretrained model, whether
    downloaded, in memory or from a file: BatchNorm frozen to the statistics the
    weights came with and the first stages fixed. From scratch, and from the
    checkpoint of a run from scratch, every layer trains and norms are live.
    Predictors for another number of classes (the COCO weights' 91) are
    replaced by fresh ones, as the tutorial does.
    """
    if backbone not in BACKBONES:
        raise LeanError(f"--backbone {backbone}: unknown; choose one of {', '.join(BACKBONES)}")
    pretrained, download = weights != "none", weights == "coco"  # (a dict is equal to neither)
    state = None
    if pretrained and not download:
        name = "the state dict given" if isinstance(weights, dict) else weights
        state, pretrained = read_weights(weights)
    with _download_errors("COCO" if backbone == "resnet50_fpn" else "ImageNet"):
        model = _BUILDERS[backbone](num_classes, pretrained, download, min_size, max_size)
    transform = model.transform
    model.transform = Uint8Transform(min_size, max_size, transform.image_mean, transform.image_std)
    heads = model.roi_heads
    heads.box_roi_pool, heads.mask_roi_pool = SparseRoIAlign.like(heads.box_roi_pool), SparseRoIAlign.like(heads.mask_roi_pool)
    if state is not None:
        try:
            model.load_state_dict(_with_own_predictors(model, state, name))
        except RuntimeError as error:
            raise LeanError(
                f"{name}: does not fit a {backbone} Mask R-CNN with {num_classes} classes ({str(error).splitlines()[0]})"
            ) from None
    fold_frozen_norms(model)
    return model


PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


def _with_own_predictors(model, state, name):
    """`state`, its predictors swapped for the model's own where they are for another number of classes.

    What the tutorial does to the COCO weights: 91 classes' predictors make way for freshly initialised
    ones. So a file of those weights (or of any other model of the same architecture) fine-tunes as
    `--weights coco` does; weights for this many classes, a lean checkpoint say, load whole.
    """
    own = model.state_dict()
    if not any(key.startswith(PREDICTORS) and key in own and value.shape != own[key].shape for key, value in state.items()):
        return state
    print(f"{name}: its predictors are for another number of classes; training fresh ones, as the tutorial does", file=sys.stderr)
    return {key: value for key, value in state.items() if not key.startswith(PREDICTORS)} | {
        key: value for key, value in own.items() if key.startswith(PREDICTORS)
    }


def tune_for_speed(model, channels_last=True, compile_backbone=True):
    """lean.train's speed settings, in one place: channels-last weights and batches, a compiled backbone.

    Compiling also pads each batch to a canvas from `canvas_ladder`, so the statically shaped backbone
    meets few distinct shapes, and lets dynamo keep a graph for each of them (two batch sizes: the last
    batch of an epoch may be short). Compiles in place: state dict keys are unchanged.
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.transform.channels_last = True
    if compile_backbone:
        transform = model.transform
        transform.canvas_ladder = canvas_ladder(transform.min_size[0], transform.max_size)
        limit = 2 * len(transform.canvas_ladder) ** 2
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        if compile_backbone == "cudagraphs":  # no code generation: the eager kernels, replayed as CUDA graphs
            model.backbone.compile(backend="cudagraphs", dynamic=False)
        else:
            # Inductor lays out a CPU model's convolutions channels-last whatever it is given; told not to, it
            # keeps the layout chosen here (on an fp32 CPU, contiguous: see lean.train.channels_last_is_fast).
            model.backbone.compile(dynamic=False, options={"layout_optimization": channels_last})
    return model


def _resnet50_fpn(num_classes, pretrained, download, min_size, max_size):
    # maskrcnn_resnet50_fpn's model, built here so that weights from a file get the layout it gives
    # downloaded ones; it only gives that layout to weights it downloads.
    norm = torchvision.ops.misc.FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=norm, trainable_layers=3 if pretrained else 5)
    model = MaskRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size)
    if download:
        model.load_state_dict(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True, check_hash=True))
    if pretrained:  # the COCO weights were trained with no epsilon in their frozen BatchNorm; torchvision sets it so
        overwrite_eps(model, 0.0)
    box_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, num_classes)
    mask_features = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_features, MASK_HIDDEN, num_classes)
    return model


def _mobilenet_v2(num_classes, pretrained, download, min_size, max_size):
    # The tutorial's recipe keeps MobileNetV2's live BatchNorm, pretrained or not.
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1 if download else None
    backbone = torchvision.models.mobilenet_v2(weights=weights).features
    backbone.out_channels = 1280
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2),
    )


def _mobilenet_v3_fpn(num_classes, pretrained, download, min_size, max_size):
    weights = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1 if download else None
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=weights,
        fpn=True,
        trainable_layers=3 if pretrained else 6,
        norm_layer=torchvision.ops.misc.FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d,
    )
    # Anchors one octave smaller than torchvision's for this backbone: meant for small images.
    anchors = AnchorGenerator(sizes=((16, 32, 64, 128, 256),) * 3, aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return _small_mask_rcnn(backbone, anchors, SMALL_HIDDEN, num_classes, min_size, max_size)


def _resnet18_fpn(num_classes, pretrained, download, min_size, max_size):
    # From scratch, GroupNorm rather than BatchNorm, in the trunk, the FPN and the mask head: the statistics
    # of a batch of 2-4 images are noisy, and the running ones that evaluation would use lag far behind a
    # network that is still changing fast. (The FPN's and mask head's GroupNorm bought 0.03 segm AP.)
    norm = torchvision.ops.misc.FrozenBatchNorm2d if pretrained else _group_norm
    trunk = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if download else None, norm_layer=norm)
    if pretrained:  # torchvision's default for a pretrained detection backbone: the first stages stay as trained
        for module in (trunk.conv1, trunk.layer1):
            module.requires_grad_(False)
    # All four stages, strides 4 to 32: masks of small figures are pooled from the stride-4 level,
    # where a leg a few pixels wide is still there to see.
    stages = {f"layer{k}": str(k - 1) for k in range(1, 5)}
    backbone = BackboneWithFPN(trunk, stages, [64, 128, 256, 512], SLIM_CHANNELS, extra_blocks=LastLevelMaxPool(), norm_layer=_group_norm)
    # One anchor size per level (strides 4 to 64), three shapes each.
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return _small_mask_rcnn(backbone, anchors, SLIM_CHANNELS, num_classes, min_size, max_size, mask_convs=4, box_batch_size_per_image=64, norm=_group_norm)


def _group_norm(channels):
    return torch.nn.GroupNorm(min(32, channels // 4), channels)


def _small_mask_rcnn(backbone, anchors, hidden, num_classes, min_size, max_size, mask_convs=2, box_batch_size_per_image=128, norm=None):
    """A Mask R-CNN sized for small images on a CPU.

    A quarter of torchvision's proposals, a quarter (or less) of its sampled regions, and slim heads: with
    torchvision's heads the mask head's four 256-channel convolutions and RoIAlign's backward take most of
    a CPU step. Half the sampled regions are positives where there are enough (torchvision: a quarter):
    the mask head learns from positives only, and from scratch it starved on a quarter (half bought
    0.02 segm AP).
    `norm`, if given, follows each of the mask head's convolutions.
    """
    channels = backbone.out_channels
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below carry it
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_score_thresh=0.05,
        rpn_pre_nms_top_n_train=500,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=250,
        rpn_post_nms_top_n_test=250,
        box_batch_size_per_image=box_batch_size_per_image,
        box_positive_fraction=0.5,
        box_detections_per_img=50,
        box_head=TwoMLPHead(channels * 7 * 7, hidden * 4),
        box_predictor=FastRCNNPredictor(hidden * 4, num_classes),
        mask_head=MaskRCNNHeads(channels, (hidden,) * mask_convs, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(hidden, hidden, num_classes),
    )


_BUILDERS = {
    "resnet50_fpn": _resnet50_fpn,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_fpn": _mobilenet_v3_fpn,
    "resnet18_fpn": _resnet18_fpn,
}


class _download_errors:
    """Turn a failed weights download into one line that names the ways around it."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, (urllib.error.URLError, OSError, RuntimeError)) and _is_download_error(error):
            reason = getattr(error, "reason", None) or str(error).splitlines()[0]
            raise LeanError(
                f"cannot download the {self.what} weights ({reason}); train from scratch with --weights none, "
                "or pass --weights FILE with a state dict or lean checkpoint"
            ) from None
        return False


def _is_download_error(error):
    text = str(error).lower()
    return isinstance(error, urllib.error.URLError) or any(
        word in text for word in ("download", "urlopen", "connection", "hash", "name or service", "network")
    )


def read_weights(source):
    """(state dict, pretrained) from a file's path or from what torch.load gave. A plain state dict is
    pretrained weights; a lean checkpoint's "model" entry is too, unless its run trained from scratch:
    then its model is built as that run's was."""
    loaded = source
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise LeanError(f"--weights {path}: no such file (or use coco or none)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and torch errors alike: the file is not usable weights
            raise LeanError(f"{path}: not a loadable weights file ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise LeanError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if isinstance(loaded.get("model"), dict):
        run_args = loaded.get("args")
        return loaded["model"], not (isinstance(run_args, dict) and run_args.get("weights") == "none")
    return loaded, True
