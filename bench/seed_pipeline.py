"""The tutorial's own data path, written here from its description, as the baseline lean is measured against.

Per item it decodes the image and the mask PNGs, splits the mask into one
binary mask per instance id, finds each box with np.where, and converts to
tensors; pairs are taken by position in two sorted listings. Two changes
from the tutorial, both so it can serve as a reference on any input: an
image without any background pixel keeps its first instance (the tutorial
drops the first id unconditionally), and an image without instances gives
empty targets instead of crashing.
"""

import os

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as F


def seed_targets(id_map, index):
    """Targets the tutorial's way: one np.where per instance."""
    ids = np.unique(id_map)
    ids = ids[ids != 0]
    masks = id_map == ids[:, None, None]
    boxes = []
    for mask in masks:
        rows, cols = np.where(mask)
        boxes.append([np.min(cols), np.min(rows), np.max(cols), np.max(rows)])
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": torch.ones((len(ids),), dtype=torch.int64),
        "masks": torch.as_tensor(masks, dtype=torch.uint8),
        "image_id": torch.tensor([index]),
        "area": (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]),
        "iscrowd": torch.zeros((len(ids),), dtype=torch.int64),
    }


class SeedPennFudan(torch.utils.data.Dataset):
    """The tutorial's PennFudanDataset with its ToTensor (and, for training, flip) transform."""

    def __init__(self, root, train=False):
        self.root, self.train = root, train
        self.images = sorted(os.listdir(os.path.join(root, "PNGImages")))
        self.masks = sorted(os.listdir(os.path.join(root, "PedMasks")))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.open(os.path.join(self.root, "PNGImages", self.images[index])).convert("RGB")
        id_map = np.array(Image.open(os.path.join(self.root, "PedMasks", self.masks[index])))
        target = seed_targets(id_map, index)
        image = F.to_tensor(image)
        if self.train and torch.rand(1) < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            target["boxes"][:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["masks"] = target["masks"].flip(-1)
        return image, target

    def get_height_and_width(self, index):
        with Image.open(os.path.join(self.root, "PNGImages", self.images[index])) as image:
            return image.height, image.width


def collate(batch):
    return tuple(zip(*batch))


def seed_loader(root, batch_size=2, workers=0, shuffle=False, train=False):
    return torch.utils.data.DataLoader(
        SeedPennFudan(root, train), batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate
    )


def seed_model(min_size, max_size):
    """The tutorial's model as it trains it, eager fp32, but randomly initialised (no downloads here).

    The tutorial asks torchvision for the COCO weights, and torchvision builds a model for them with
    BatchNorm frozen (epsilon 0) and the stem and first stage fixed; it replaces both predictors for two
    classes. The same model is built here from the same parts, so its step does the fine-tuning's work:
    a model built without weights (live BatchNorm, every layer trained) would do more.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    model = MaskRCNN(backbone, num_classes=2, min_size=min_size, max_size=max_size)
    overwrite_eps(model, 0.0)
    return model


def seed_detector(min_size, max_size):
    """The tutorial's first model, Faster R-CNN, as `seed_model` builds its Mask R-CNN: fasterrcnn_resnet50_fpn's
    fine-tuning layout (BatchNorm frozen, epsilon 0, the first stages fixed), randomly initialised, its box
    predictor a FastRCNNPredictor for two classes."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    model = FasterRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size)
    overwrite_eps(model, 0.0)
    model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, 2)
    return model


def seed_mobilenet_detector(min_size, max_size):
    """The tutorial's second recipe: a FasterRCNN on MobileNetV2's features (1280 channels, one feature map),
    5 x 3 anchors and a 7 x 7 RoIAlign on that map, randomly initialised."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = torchvision.models.mobilenet_v2(weights=None).features
    backbone.out_channels = 1280
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors, box_roi_pool=pooler,
                      min_size=min_size, max_size=max_size)  # fmt: skip


def seed_model_from_scratch(min_size, max_size):
    """What the tutorial's call builds without weights (live BatchNorm, every layer trained), as
    `lean.train --weights none` builds it: the model of the tutorial's whole job where no weights can be
    downloaded, since from a random init the frozen layout of `seed_model` diverges."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=min_size,
                                 max_size=max_size)  # fmt: skip


def seed_step(model, optimizer, images, targets, device):
    """The tutorial's training step on one batch: copied to `device`, the five losses summed, one SGD step;
    returns the summed loss, not read (reading it waits for the device)."""
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def seed_evaluate(root, indices, predictions):
    """The references' evaluation, as the tutorial runs it: ground truth rebuilt by iterating the dataset
    (decoding every test image and mask), results prepared image by image on one CPU thread, then COCOeval.
    Returns {"bbox": 12 stats, "segm": 12 stats}."""
    import contextlib
    import io

    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = SeedPennFudan(root)
    images, annotations = [], []
    for index in indices:
        image, target = dataset[index]
        images.append({"id": int(index), "height": image.shape[-2], "width": image.shape[-1]})
        boxes = target["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for box, area, crowd, mask in zip(
            boxes.tolist(), target["area"].tolist(), target["iscrowd"].tolist(), target["masks"].numpy()
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(index),
                    "category_id": 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": crowd,
                    "segmentation": mask_util.encode(np.asfortranarray(mask)),
                }
            )
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    results = {"bbox": [], "segm": []}
    for index, prediction in zip(indices, predictions):  # the per-image update
        boxes = prediction["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label, mask in zip(
            boxes.tolist(), prediction["scores"].tolist(), prediction["labels"].tolist(), prediction["masks"]
        ):
            common = {"image_id": int(index), "category_id": label, "score": score}
            results["bbox"].append({**common, "bbox": box})
            rle = mask_util.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
            results["segm"].append({**common, "segmentation": rle})
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        for kind, found in results.items():
            evaluator = COCOeval(truth, truth.loadRes(found), kind)
            evaluator.params.imgIds = [int(index) for index in indices]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[kind] = [float(value) for value in evaluator.stats]
    return stats


class ReferencesCoco(torch.utils.data.Dataset):
    """The COCO data path of torchvision's references/detection, written here from its description: the
    annotation file read with pycocotools, and per item the image decoded with PIL, crowd annotations
    dropped, every polygon rasterised with pycocotools, boxes from bbox as [x, y, x + w, y + h] clipped to
    the image, degenerate boxes dropped, the image made a uint8 tensor (as lean's loader hands it over)."""

    def __init__(self, annotations, images):
        import contextlib
        import io

        from pycocotools.coco import COCO

        self.folder = images
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(os.path.join(self.folder, info["file_name"])).convert("RGB")
        annotations = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        width, height = image.size
        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        masks = _polygons_to_masks([a["segmentation"] for a in annotations], height, width)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)[keep],
            "masks": masks[keep],
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in annotations], dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        return F.pil_to_tensor(image), target


def _polygons_to_masks(segmentations, height, width):
    from pycocotools import mask as mask_util

    masks = []
    for polygons in segmentations:
        rles = mask_util.frPyObjects(polygons, height, width)
        mask = torch.as_tensor(mask_util.decode(rles), dtype=torch.uint8)
        masks.append(mask.any(dim=2) if mask.dim() == 3 else mask)
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    return torch.stack(masks).to(torch.uint8)


def references_coco_loader(annotations, images, batch_size=2, workers=2):
    return torch.utils.data.DataLoader(
        ReferencesCoco(annotations, images), batch_size=batch_size, num_workers=workers, collate_fn=collate
    )
