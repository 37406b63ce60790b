"""Mask R-CNN and Faster R-CNN models for lean: the tutorial's two recipes and small ones for CPUs.

A spec's task picks the kind: "segment" builds torchvision's Mask R-CNN, "detect" its Faster R-CNN,
the same backbones, anchors and box heads without the mask branch (the tutorial's first section).

    resnet50_fpn      the tutorial's fine-tuning recipe: torchvision's Mask R-CNN
                      with its box and mask predictors replaced for num_classes
    resnet50_fpn_v2   the same recipe on torchvision's better v2 models (47.4 box /
                      41.8 mask AP on COCO against 37.9 / 34.6): live BatchNorm,
                      convolutional box head, a deeper RPN head
    mobilenet_v2      the tutorial's second recipe: MobileNetV2 features as the
                      backbone (1280 channels, one feature map), 5 x 3 anchors
    mobilenet_v3_fpn  MobileNetV3-Large with an FPN: small and fast, for CPUs and tests
    resnet18_fpn      ResNet-18 with a slim FPN and GroupNorm: the one to train from
                      scratch on a CPU (see the README's convergence check)

Every model takes uint8 or float images: lean's transform folds the uint8 to
[0, 1] conversion into its normalisation, so the loader can hand over the
bytes it read. Every model pools its regions with lean.roi_align's
SparseRoIAlign: torchvision's results, several times faster on the CPU. With
a speed whose batched_heads is on, the RPN and RoI heads train over the whole
batch at once (lean.heads): torchvision's losses from torchvision's regions,
without its per-image host syncs. And every frozen BatchNorm is folded into the convolution before it
(lean.frozen_norm): the same function, one pass over the activations.
"""

import sys
from dataclasses import dataclass

import torch
import torchvision
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lean.errors import LeanError, reason
from lean.frozen_norm import fold_frozen_norms
from lean.internals import overwrite_eps, resnet_fpn_extractor
from lean.roi_align import SparseRoIAlign
from lean.speed import tune_for_speed
from lean.transform import Uint8Transform
from lean.weights import downloading

BACKBONES = ("resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v2", "mobilenet_v3_fpn", "resnet18_fpn")
COCO_BACKBONES = ("resnet50_fpn", "resnet50_fpn_v2")  # downloaded whole from COCO; the others' trunk from ImageNet
TASKS = ("segment", "detect")  # Mask R-CNN: boxes and masks; Faster R-CNN: boxes
MASK_HIDDEN = 256
SMALL_HIDDEN = 128  # channels of mobilenet_v3_fpn's mask head; its box head has 4x this
SLIM_CHANNELS = 64  # resnet18_fpn's FPN and mask head channels; its box head has 4x this


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model again, weights aside: what a checkpoint keeps beside them.

    `pretrained`: the layout pretrained weights get (BatchNorm frozen to their statistics, the first
    stages fixed), as opposed to training from scratch (every layer trained, norms live).
    """

    backbone: str = "resnet50_fpn"
    class_names: tuple[str, ...] = ("person",)
    min_size: int = 800
    max_size: int = 1333
    pretrained: bool = True
    category_ids: tuple[int, ...] | None = None  # each class's id in the data it came from; default 1..K
    task: str = "segment"  # checkpoints from before the task was chosen are Mask R-CNNs

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise LeanError(f"unknown backbone {self.backbone!r}; lean builds {', '.join(BACKBONES)}")
        if self.task not in TASKS:
            raise LeanError(f"unknown task {self.task!r}; lean trains {', '.join(TASKS)}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        ids = range(1, len(self.class_names) + 1) if self.category_ids is None else self.category_ids
        object.__setattr__(self, "category_ids", tuple(int(i) for i in ids))
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.category_ids)} category ids")

    @property
    def num_classes(self):
        """Classes the predictors score, background included."""
        return len(self.class_names) + 1

    @property
    def masks(self):
        """Whether the model predicts masks (Mask R-CNN) or boxes alone (Faster R-CNN)."""
        return self.task == "segment"

    @property
    def kind(self):
        return "Mask R-CNN" if self.masks else "Faster R-CNN"

    @property
    def metrics(self):
        """The COCO metrics its predictions are scored by."""
        return ("bbox", "segm") if self.masks else ("bbox",)

    @property
    def main_metric(self):
        """The metric whose AP best.pt keeps the best of: what the model adds last."""
        return self.metrics[-1]


def create_model(spec, state=None, speed=None, device="cpu", download=False):
    """The Mask R-CNN or Faster R-CNN `spec` describes, for its classes (background included), on `device`, with
    `speed` (a lean.speed.Speed) applied if given: the one place lean builds a model.

    state: a state dict to load; predictors for another number of classes (the COCO weights' 91) make
    way for fresh ones, as the tutorial replaces them, and the rest must fit. Where `state` fits whole (a lean
    checkpoint's) the model takes its tensors as its own, uncopied. download: start from the
    published weights through torchvision (COCO Mask R-CNN or Faster R-CNN for resnet50_fpn, ImageNet
    backbone for the others); only for a spec in the pretrained layout.
    """
    if download and not spec.pretrained:
        raise ValueError("downloaded weights come in the pretrained layout")
    with downloading("COCO" if spec.backbone in COCO_BACKBONES else "ImageNet"):
        model = _built(spec, download, state)
    transform = model.transform
    model.transform = Uint8Transform(spec.min_size, spec.max_size, transform.image_mean, transform.image_std)
    heads = model.roi_heads
    heads.box_roi_pool = SparseRoIAlign.like(heads.box_roi_pool)
    if spec.masks:
        heads.mask_roi_pool = SparseRoIAlign.like(heads.mask_roi_pool)
    fold_frozen_norms(model)
    model = model.to(device)
    return tune_for_speed(model, speed) if speed is not None else model


def _built(spec, download, state):
    """torchvision's model for `spec`, with `state` loaded. Built on the meta device where `state` fills every
    weight (a lean checkpoint's), so that no weight is initialised only to be overwritten."""

    def build():
        return _BUILDERS[spec.backbone](
            spec.num_classes, spec.pretrained, download, spec.min_size, spec.max_size, spec.masks
        )

    if state is None:
        return build()
    with torch.device("meta"):
        model = build()
    assign = _fills(model, state)
    if not assign:  # weights for another number of classes: the predictors are trained afresh
        model = build()
        state = _with_own_predictors(model, state)
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as error:
        raise LeanError(
            f"the state dict does not fit a {spec.backbone} {spec.kind} with {spec.num_classes} classes "
            f"({reason(error)})"
        ) from None
    if assign:  # the anchors are tensors made in __init__, outside the state dict: on meta, made again
        anchors = model.rpn.anchor_generator
        anchors.cell_anchors = [anchors.generate_anchors(*level) for level in zip(anchors.sizes, anchors.aspect_ratios)]
    return model


def _fills(model, state):
    """Whether `state` has a tensor of the right shape and type for every entry of `model`'s state dict."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(
        isinstance(state[key], torch.Tensor) and (state[key].shape, state[key].dtype) == (value.shape, value.dtype)
        for key, value in own.items()
    )


def create_torchvision_model(spec, state):
    """torchvision's own model for `spec`, none of lean's faster parts swapped in, with `state` (a lean model's
    state dict, whose keys are torchvision's): what lean.export hands to torchvision's exporters."""
    model = _BUILDERS[spec.backbone](spec.num_classes, spec.pretrained, False, spec.min_size, spec.max_size, spec.masks)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise LeanError(f"the state dict does not fit a {spec.backbone} {spec.kind} ({reason(error)})") from None
    return model


PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


def _with_own_predictors(model, state):
    """`state`, its predictors swapped for the model's own where they are for another number of classes.

    What the tutorial does to the COCO weights: 91 classes' predictors make way for freshly initialised
    ones. So a file of those weights (or of any other model of the same architecture) fine-tunes as
    downloading them does; weights for this many classes, a lean checkpoint say, load whole.
    """
    own = model.state_dict()
    if not any(
        key.startswith(PREDICTORS) and key in own and value.shape != own[key].shape for key, value in state.items()
    ):
        return state
    print(
        "the weights' predictors are for another number of classes; training fresh ones, as the tutorial does",
        file=sys.stderr,
    )
    return {key: value for key, value in state.items() if not key.startswith(PREDICTORS)} | {
        key: value for key, value in own.items() if key.startswith(PREDICTORS)
    }


def _detector(masks, backbone, mask_branch=None, **box_parts):
    """torchvision's Mask R-CNN with `mask_branch` (its mask arguments), or with `masks` False its Faster
    R-CNN: the same backbone, anchors and box heads."""
    return MaskRCNN(backbone, **box_parts, **(mask_branch or {})) if masks else FasterRCNN(backbone, **box_parts)


def _resnet50_fpn(num_classes, pretrained, download, min_size, max_size, masks=True):
    # maskrcnn_resnet50_fpn's (fasterrcnn_resnet50_fpn's) model, built here so that weights from a file get
    # the layout it gives downloaded ones; it only gives that layout to weights it downloads.
    norm = torchvision.ops.misc.FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=norm, trainable_layers=3 if pretrained else 5
    )
    model = _detector(masks, backbone, num_classes=91, min_size=min_size, max_size=max_size)
    if download:
        published = MaskRCNN_ResNet50_FPN_Weights if masks else FasterRCNN_ResNet50_FPN_Weights
        model.load_state_dict(published.COCO_V1.get_state_dict(progress=True, check_hash=True))
    if pretrained:  # the COCO weights were trained with no epsilon in their frozen BatchNorm; torchvision sets it so
        overwrite_eps(model, 0.0)
    box_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, num_classes)
    if masks:
        mask_features = model.roi_heads.mask_predictor.conv5_mask.in_channels
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_features, MASK_HIDDEN, num_classes)
    return model


def _resnet50_fpn_v2(num_classes, pretrained, download, min_size, max_size, masks=True):
    # maskrcnn_resnet50_fpn_v2's (fasterrcnn_resnet50_fpn_v2's) model, built here so that weights from a file get
    # the layout it gives downloaded ones: BatchNorm live throughout, the first stages fixed when pretrained.
    backbone = resnet_fpn_extractor(
        torchvision.models.resnet50(weights=None), 3 if pretrained else 5, norm_layer=torch.nn.BatchNorm2d
    )
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    channels = backbone.out_channels
    mask_branch = {"mask_head": MaskRCNNHeads(channels, [256] * 4, 1, norm_layer=torch.nn.BatchNorm2d)}
    model = _detector(
        masks,
        backbone,
        mask_branch,
        num_classes=91,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024], norm_layer=torch.nn.BatchNorm2d),
    )
    if download:
        published = MaskRCNN_ResNet50_FPN_V2_Weights if masks else FasterRCNN_ResNet50_FPN_V2_Weights
        model.load_state_dict(published.COCO_V1.get_state_dict(progress=True, check_hash=True))
    model.roi_heads.box_predictor = FastRCNNPredictor(1024, num_classes)
    if masks:
        model.roi_heads.mask_predictor = MaskRCNNPredictor(256, MASK_HIDDEN, num_classes)
    return model


def _mobilenet_v2(num_classes, pretrained, download, min_size, max_size, masks=True):
    # The tutorial's recipe keeps MobileNetV2's live BatchNorm, pretrained or not.
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1 if download else None
    backbone = torchvision.models.mobilenet_v2(weights=weights).features
    backbone.out_channels = 1280
    return _detector(
        masks,
        backbone,
        {"mask_roi_pool": MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2)},
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
    )


def _mobilenet_v3_fpn(num_classes, pretrained, download, min_size, max_size, masks=True):
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
    return _small_detector(masks, backbone, anchors, SMALL_HIDDEN, num_classes, min_size, max_size)


def _resnet18_fpn(num_classes, pretrained, download, min_size, max_size, masks=True):
    # From scratch, GroupNorm rather than BatchNorm, in the trunk, the FPN and the mask head: the statistics
    # of a batch of 2-4 images are noisy, and the running ones that evaluation would use lag far behind a
    # network that is still changing fast (docs/convergence.md).
    norm = torchvision.ops.misc.FrozenBatchNorm2d if pretrained else _group_norm
    trunk = torchvision.models.resnet18(
        weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if download else None, norm_layer=norm
    )
    if pretrained:  # torchvision's default for a pretrained detection backbone: the first stages stay as trained
        for module in (trunk.conv1, trunk.layer1):
            module.requires_grad_(False)
    # All four stages, strides 4 to 32: masks of small figures are pooled from the stride-4 level,
    # where a leg a few pixels wide is still there to see.
    stages = {f"layer{k}": str(k - 1) for k in range(1, 5)}
    backbone = BackboneWithFPN(
        trunk, stages, [64, 128, 256, 512], SLIM_CHANNELS, extra_blocks=LastLevelMaxPool(), norm_layer=_group_norm
    )
    # One anchor size per level (strides 4 to 64), three shapes each.
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return _small_detector(
        masks,
        backbone,
        anchors,
        SLIM_CHANNELS,
        num_classes,
        min_size,
        max_size,
        mask_convs=4,
        box_batch_size_per_image=64,
        norm=_group_norm,
    )


def _group_norm(channels):
    return torch.nn.GroupNorm(min(32, channels // 4), channels)


def _small_detector(
    masks, backbone, anchors, hidden, num_classes, min_size, max_size, mask_convs=2, box_batch_size_per_image=128,
    norm=None,
):  # fmt: skip
    """A Mask R-CNN (or with `masks` False, a Faster R-CNN) sized for small images on a CPU.

    A quarter of torchvision's proposals, a quarter (or less) of its sampled regions, and slim heads: with
    torchvision's heads the mask head's four 256-channel convolutions and RoIAlign's backward take most of
    a CPU step. Half the sampled regions are positives where there are enough (torchvision: a quarter):
    the mask head learns from positives only, and from scratch it starved on a quarter (docs/convergence.md).
    `norm`, if given, follows each of the mask head's convolutions.
    """
    channels = backbone.out_channels
    box_head, box_predictor = TwoMLPHead(channels * 7 * 7, hidden * 4), FastRCNNPredictor(hidden * 4, num_classes)
    mask_branch = masks and {  # made after the box heads, as ever: a seed initialises the same weights
        "mask_head": MaskRCNNHeads(channels, (hidden,) * mask_convs, 1, norm_layer=norm),
        "mask_predictor": MaskRCNNPredictor(hidden, hidden, num_classes),
    }
    return _detector(
        masks,
        backbone,
        mask_branch,
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
        box_head=box_head,
        box_predictor=box_predictor,
    )


_BUILDERS = {
    "resnet50_fpn": _resnet50_fpn,
    "resnet50_fpn_v2": _resnet50_fpn_v2,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_fpn": _mobilenet_v3_fpn,
    "resnet18_fpn": _resnet18_fpn,
}
