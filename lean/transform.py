"""The model's resize-and-normalise step, torchvision's, taking uint8 images and without its host syncs."""

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from lean.canvas import pad_to_canvas
from lean.internals import resize_image_and_masks
from lean.paste import paste_masks


class Uint8Transform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise step, taking uint8 images as well as floats in [0, 1].

    Without torchvision's host-to-device copies and syncs: the normalisation's mean and standard deviation
    are kept on the device, boxes are scaled by plain numbers rather than by tensors made on their device,
    and predicted masks are pasted into the image all at once (lean.paste). With `channels_last`, the padded
    batch is laid out channels-last, as the convolutions of a channels-last model want it; with a
    `canvas_ladder`, it is padded to a canvas.
    """

    channels_last = False
    canvas_ladder = None

    def normalize(self, image):
        if not image.is_floating_point():
            image = image.float().div_(255)
        mean, std = self._statistics(image.dtype, image.device)
        return (image - mean) / std

    def _statistics(self, dtype, device):
        key = (dtype, device)
        if getattr(self, "_cached", (None,))[0] != key:
            mean = torch.as_tensor(self.image_mean, dtype=dtype, device=device)[:, None, None]
            std = torch.as_tensor(self.image_std, dtype=dtype, device=device)[:, None, None]
            self._cached = key, mean, std
        return self._cached[1:]

    def resize(self, image, target=None):
        if target is None:
            return super().resize(image, target)
        height, width = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]  # the RNG drawn as ever
        image, target = resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
        ratio_height, ratio_width = image.shape[-2] / height, image.shape[-1] / width
        x0, y0, x1, y1 = target["boxes"].unbind(1)
        target["boxes"] = torch.stack((x0 * ratio_width, y0 * ratio_height, x1 * ratio_width, y1 * ratio_height), dim=1)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for prediction, resized_to, original in zip(result, image_shapes, original_image_sizes):
            ratio_height, ratio_width = (_ratio(new, old) for new, old in zip(original, resized_to))
            x0, y0, x1, y1 = prediction["boxes"].unbind(1)
            boxes = torch.stack((x0 * ratio_width, y0 * ratio_height, x1 * ratio_width, y1 * ratio_height), dim=1)
            prediction["boxes"] = boxes
            if "masks" in prediction:  # every detection at once: torchvision reads each box to the host
                prediction["masks"] = paste_masks(prediction["masks"], boxes, *original)
        return result

    def batch_images(self, images, size_divisible=32):
        if self.canvas_ladder is None:
            batch = super().batch_images(images, size_divisible)
        else:
            batch = pad_to_canvas(images, self.canvas_ladder)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


def _ratio(new, old):
    """new / old as torchvision's resize_boxes works it out (in float32), as a plain number."""
    return float(torch.tensor(new, dtype=torch.float32) / torch.tensor(old, dtype=torch.float32))
