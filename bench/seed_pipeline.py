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
