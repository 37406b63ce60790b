"""torchvision's region proposal network and RoI heads, trained over the whole batch at once with fixed shapes.

torchvision trains its RPN and RoI heads image by image, selecting with `torch.where` and boolean masks: each
selection makes the host wait for the device (docs/performance.md counts them). `batch_heads(model)` keeps the
model's modules, weights and state-dict keys and gives its training step another path to the same losses:

    proposals      each image's top boxes per level, filtered and suppressed (NMS) with validity masks, padded
                   to torchvision's post-NMS count; on a GPU the suppression is torchvision's greedy NMS computed
                   as a fixed point over a padded IoU matrix, on the CPU torchvision's own kernel
    matching       gt boxes padded to the batch's most, one IoU tensor and one argmax for all images
    sampling       every image's positive and negative counts read in one sync per head; the regions then
                   drawn with torchvision's randperm calls in torchvision's order, so one generator gives
                   torchvision's regions
    losses         masked sums over fixed shapes, divided by the host's counts
    RoIAlign       the sampled regions' and the mask positives' per-level counts read together, once

Evaluation runs torchvision's own code.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

FIRST_NMS_ROUNDS = 8  # fixed-point rounds run before the read that says whether they sufficed; doubled when not
UNMATCHED, BETWEEN = -1, -2  # torchvision's Matcher.BELOW_LOW_THRESHOLD and BETWEEN_THRESHOLDS


@dataclass
class Proposals:
    """Each image's proposals padded to one count: boxes (N, P, 4), valid (N, P), the valid ones first."""

    boxes: torch.Tensor
    valid: torch.Tensor


def batch_heads(model):
    """Give `model` (a torchvision Mask R-CNN or Faster R-CNN) the batched training path; returns it."""
    model.__class__ = {MaskRCNN: BatchedMaskRCNN, FasterRCNN: BatchedFasterRCNN}.get(type(model), type(model))
    model.rpn.__class__ = BatchedRPN
    model.roi_heads.__class__ = BatchedRoIHeads
    return model


def torchvision_heads(model):
    """Undo batch_heads: `model` trains with torchvision's own code again, the baseline lean.heads is measured by."""
    model.__class__ = {BatchedMaskRCNN: MaskRCNN, BatchedFasterRCNN: FasterRCNN}.get(type(model), type(model))
    model.rpn.__class__, model.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    return model


def use_fixed_shapes(model, fixed=True):
    """Make the heads take the GPU's path (fixed-shape NMS, RoIAlign by level) whatever the device, or with
    `fixed` None, choose by device: what bench.syncs needs to count on the CPU the syncs a GPU would make."""
    model.rpn.fixed_shapes = fixed
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        if pool is not None:
            pool.by_level = fixed
    return model


class _BatchedTraining:
    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images, targets)
        # torchvision's per-image check for degenerate boxes is left out: lean's loader leaves them out on the host.
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(images, features, targets)
        _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        return {**detector_losses, **proposal_losses}


class BatchedMaskRCNN(_BatchedTraining, MaskRCNN):
    pass


class BatchedFasterRCNN(_BatchedTraining, FasterRCNN):
    pass


class BatchedRPN(RegionProposalNetwork):
    fixed_shapes = None  # None: on a GPU only
    nms_rounds = FIRST_NMS_ROUNDS

    def forward(self, images, features, targets=None):
        if not self.training:
            return super().forward(images, features, targets)
        features = list(features.values())
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        num_images = len(anchors)
        decoded = decode(self.box_coder, deltas.detach(), torch.cat(anchors)).view(num_images, -1, 4)
        fixed = _on_gpu_path(self.fixed_shapes, decoded)
        proposals, converged = self.propose(decoded, objectness, images.image_sizes, per_level, fixed)

        anchors = anchors[0]
        gt, gt_valid = padded_gt(targets, "boxes", anchors.dtype)
        matches = match(pairwise_iou(gt, anchors[None].expand(num_images, -1, -1)), gt_valid, self.proposal_matcher)
        labels = (matches >= 0).float().masked_fill(matches == BETWEEN, -1.0)
        matched = gather_boxes(gt, matches.clamp(min=0))
        positives, negatives, counts = sample(labels >= 1, labels == 0, self.fg_bg_sampler, converged)
        if not counts.pop():  # NMS needed more rounds: finish it, and run as many more the next time
            proposals, _ = self.propose(decoded, objectness, images.image_sizes, per_level, fixed, until_done=True)
            self.nms_rounds *= 2
        total = sum(counts)

        targets_ = encode(self.box_coder, matched.reshape(-1, 4), anchors.repeat(num_images, 1))
        box_loss = F.smooth_l1_loss(deltas, targets_, beta=1 / 9, reduction="none").sum(1)
        box_loss = torch.where(positives.flatten(), box_loss, 0.0).sum() / total
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten(), labels.flatten(), reduction="none")
        objectness_loss = torch.where((positives | negatives).flatten(), objectness_loss, 0.0).sum() / total
        return proposals, {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def propose(self, decoded, objectness, image_sizes, per_level, fixed, until_done=False):
        """(Proposals, converged): each image's boxes as torchvision's filter_proposals keeps them, padded to
        post_nms_top_n; `converged` a device flag (always true off the fixed-shape path)."""
        count = self.post_nms_top_n()
        if not fixed:
            boxes, _ = self.filter_proposals(decoded, objectness, image_sizes, per_level)
            return pad_proposals(boxes, count), torch.ones((), dtype=torch.bool, device=decoded.device)
        num_images = decoded.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        top = self._get_top_n_idx(objectness, per_level)
        scores = objectness.gather(1, top).sigmoid().float()
        boxes = decoded.gather(1, top[..., None].expand(-1, -1, 4)).float()
        for image, (height, width) in enumerate(image_sizes):
            boxes[image, :, 0::2].clamp_(0, width)
            boxes[image, :, 1::2].clamp_(0, height)
        sides = boxes[..., 2:] - boxes[..., :2]
        valid = (sides >= self.min_size).all(-1) & (scores >= self.score_thresh)
        kept = [min(self.pre_nms_top_n(), n) for n in per_level]
        keep, converged = nms_by_level(boxes, valid, kept, self.nms_thresh, self.nms_rounds, until_done)
        best, order = scores.masked_fill(~keep, -1.0).topk(min(count, scores.shape[1]), dim=1)
        boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        return Proposals(boxes, best >= 0), converged


class BatchedRoIHeads(RoIHeads):
    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        num_images = len(proposals.valid)
        gt, gt_valid = padded_gt(targets, "boxes", proposals.boxes.dtype)
        gt_labels, _ = padded_gt(targets, "labels")
        candidates = torch.cat([proposals.boxes, gt], 1)  # torchvision appends each image's gt boxes
        valid = torch.cat([proposals.valid, gt_valid], 1)
        matches = match(pairwise_iou(gt, candidates), gt_valid, self.proposal_matcher)
        matched_index = matches.clamp(min=0)
        labels = gt_labels.gather(1, matched_index)
        labels = labels.masked_fill(matches == UNMATCHED, 0).masked_fill((matches == BETWEEN) | ~valid, -1)
        positives, negatives, counts = sample(labels >= 1, labels == 0, self.fg_bg_sampler)
        positive_counts = counts[:num_images]

        # The sampled regions in torchvision's order: image by image, each in candidate order.
        width = candidates.shape[1]
        flat = torch.nonzero_static((positives | negatives).flatten(), size=sum(counts)).squeeze(1)
        image_index = flat.div(width, rounding_mode="floor")
        boxes = candidates.reshape(-1, 4)[flat]
        labels = labels.flatten()[flat]
        matched_index = matched_index.flatten()[flat]
        matched = gather_boxes(gt, matched_index[None], image_index[None])[0]
        regression_targets = encode(self.box_coder, matched, boxes)
        rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], 1)

        mask_positions = None
        if self.has_mask():
            mask_positions = torch.nonzero_static(labels > 0, size=sum(positive_counts)).squeeze(1)
        levels, level_counts = read_levels(self.box_roi_pool, features, rois, image_shapes, mask_positions)
        box_features = self.box_roi_pool.pool(features, rois, image_shapes, levels, level_counts[0])
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        losses = dict(
            zip(
                ("loss_classifier", "loss_box_reg"),
                box_losses(class_logits, box_regression, labels, regression_targets),
            )
        )
        if self.has_mask():
            mask_rois = rois[mask_positions]
            mask_levels = levels[mask_positions]  # the box pool's levels: the two pools share their feature maps
            mask_features = self.mask_roi_pool.pool(features, mask_rois, image_shapes, mask_levels, level_counts[1])
            mask_logits = self.mask_predictor(self.mask_head(mask_features))
            losses["loss_mask"] = mask_loss(
                mask_logits, mask_rois[:, 1:], [t["masks"] for t in targets], labels[mask_positions],
                matched_index[mask_positions], positive_counts,
            )  # fmt: skip
        return [], losses


def _on_gpu_path(fixed_shapes, tensor):
    return tensor.is_cuda if fixed_shapes is None else fixed_shapes


def padded_gt(targets, key, dtype=None):
    """Each image's targets[key] padded to the batch's most instances (one at least): (N, G, ...) and valid (N, G).
    Padding boxes are [0, 0, 1, 1]: finite wherever they are coded, never matched."""
    values = [t[key] if dtype is None else t[key].to(dtype) for t in targets]
    return _padded(values, max(1, *(len(v) for v in values)))


def pad_proposals(boxes, count):
    """torchvision's per-image proposals (lists of n_i x 4, n_i <= count) as Proposals."""
    return Proposals(*_padded(boxes, count))


def _padded(values, width):
    """(N, width, ...) of the per-image `values` (each n_i <= width long) after one another, and valid (N, width).
    Boxes are padded with [0, 0, 1, 1], anything else with zeros."""
    filler = values[0].new_zeros(values[0].shape[1:])
    if filler.shape == (4,):
        filler[2:] = 1.0  # filled on the device: a tensor made from host numbers would be a copy that waits
    padded = filler.expand(len(values), width, *filler.shape).clone()
    valid = torch.zeros(len(values), width, dtype=torch.bool, device=values[0].device)
    for image, v in enumerate(values):
        padded[image, : len(v)] = v
        valid[image, : len(v)] = True
    return padded, valid


def pairwise_iou(a, b):
    """(N, G, 4), (N, K, 4) -> (N, G, K) IoU, in torchvision's box_iou arithmetic."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    top_left = torch.max(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.min(a[:, :, None, 2:], b[:, None, :, 2:])
    sides = (bottom_right - top_left).clamp(min=0)
    inter = sides[..., 0] * sides[..., 1]
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter)


def match(quality, gt_valid, matcher):
    """(N, K) matches for quality (N, G, K), as torchvision's `matcher` gives image by image: a gt index, or
    UNMATCHED / BETWEEN; with its low-quality matches where it allows them. Padded gts never match."""
    quality = quality.masked_fill(~gt_valid[:, :, None], -1.0)
    best, matches = quality.max(dim=1)
    candidates = matches
    matches = matches.masked_fill(best < matcher.low_threshold, UNMATCHED)
    matches = matches.masked_fill((best >= matcher.low_threshold) & (best < matcher.high_threshold), BETWEEN)
    if matcher.allow_low_quality_matches:  # each gt's best candidates, ties included, take their best gt
        highest = quality.max(dim=2, keepdim=True).values
        best_for_some_gt = ((quality == highest) & gt_valid[:, :, None]).any(dim=1)
        matches = torch.where(best_for_some_gt, candidates, matches)
    return matches


def gather_boxes(gt, index, image_index=None):
    """gt (N, G, 4) at index (N, K): each candidate's matched box; with `image_index` (N, K), from that image."""
    if image_index is None:
        return gt.gather(1, index[..., None].expand(-1, -1, 4))
    return gt.reshape(-1, 4)[image_index * gt.shape[1] + index]


def in_order(mask):
    """(N, K) bool -> (N, K) long: row i starts with the positions of its Trues in increasing order."""
    num_images, width = mask.shape
    slot = torch.where(mask, mask.long().cumsum(1) - 1, width)  # the Falses to a spare column
    positions = torch.arange(width, device=mask.device).expand(num_images, width)
    return torch.zeros(num_images, width + 1, dtype=torch.int64, device=mask.device).scatter_(1, slot, positions)[
        :, :width
    ]


def sample(is_positive, is_negative, sampler, *flags):
    """(positives, negatives, counts): torchvision's BalancedPositiveNegativeSampler's picks as (N, K) masks,
    drawn with its randperm calls in its order, after one read of every image's counts (and of `flags`, device
    bools appended to the host counts); counts lists each image's sampled positives, then negatives, then flags."""
    available = torch.cat([is_positive.sum(1), is_negative.sum(1), *(f.reshape(1).long() for f in flags)])
    available = available.tolist()  # the one sync
    num_images = len(is_positive)
    most_positives = int(sampler.batch_size_per_image * sampler.positive_fraction)
    picked = []
    for mask, pool in ((is_positive, available[:num_images]), (is_negative, available[num_images : 2 * num_images])):
        picked.append((torch.zeros_like(mask), in_order(mask), pool))
    counts = [[], []]
    for image in range(num_images):
        num_positive = min(available[image], most_positives)
        num_negative = min(available[num_images + image], sampler.batch_size_per_image - num_positive)
        for kind, ((chosen, positions, pool), number) in enumerate(zip(picked, (num_positive, num_negative))):
            draw = torch.randperm(pool[image], device=chosen.device)[:number]
            chosen[image].index_fill_(0, positions[image][draw], True)
            counts[kind].append(number)
    return picked[0][0], picked[1][0], counts[0] + counts[1] + [bool(f) for f in available[2 * num_images :]]


def nms_by_level(boxes, valid, per_level, threshold, rounds, until_done=False):
    """(keep, converged): torchvision's batched_nms for each image with each level its own class, as (N, K)
    masks over boxes (N, K, 4) laid out level by level (`per_level` boxes each, each level by falling score).

    Greedy NMS keeps a box when no kept box before it overlaps it by more than `threshold`: the fixed point of
    keep = valid & not any(kept earlier box overlaps). Iterating from keep = valid settles one more box of every
    chain of overlaps each round, `rounds` of them at fixed shapes; `converged` says whether they sufficed,
    and with `until_done` twice as many more go on (a read each time) until they do.
    """
    num_images = len(boxes)
    most = max(per_level)
    grouped = boxes.new_zeros(num_images, len(per_level), most, 4)
    grouped_valid = valid.new_zeros(num_images, len(per_level), most)
    start = 0
    for level, count in enumerate(per_level):
        grouped[:, level, :count] = boxes[:, start : start + count]
        grouped_valid[:, level, :count] = valid[:, start : start + count]
        start += count
    grouped, grouped_valid = grouped.flatten(0, 1), grouped_valid.flatten(0, 1)
    earlier = torch.ones(most, most, dtype=torch.bool, device=boxes.device).triu(1)  # [j, i]: j before i
    overlaps = (pairwise_iou(grouped, grouped) > threshold) & earlier & grouped_valid[:, :, None]
    dtype = torch.float16 if boxes.is_cuda else torch.float32
    overlaps = overlaps.transpose(1, 2).to(dtype)  # [i, j]: earlier j suppresses i
    keep = grouped_valid
    with torch.autocast(boxes.device.type, enabled=False):
        while True:
            for _ in range(rounds + 1):
                previous, keep = keep, grouped_valid & ~(torch.bmm(overlaps, keep[..., None].to(dtype))[..., 0] > 0)
            converged = (previous == keep).all()
            if not until_done or converged:  # reading `converged` is a sync: only where asked to finish
                break
            rounds *= 2
    keep = keep.reshape(num_images, len(per_level), most)
    keep = torch.cat([keep[:, level, :count] for level, count in enumerate(per_level)], 1)
    return keep, converged


def encode(coder, gt, boxes):
    """torchvision's BoxCoder.encode_single of gt (M, 4) against boxes (M, 4), its weights as plain numbers: no
    tensor made from host data, no copy that waits."""
    wx, wy, ww, wh = coder.weights
    widths, heights = boxes[:, 2:3] - boxes[:, 0:1], boxes[:, 3:4] - boxes[:, 1:2]
    centre_x, centre_y = boxes[:, 0:1] + 0.5 * widths, boxes[:, 1:2] + 0.5 * heights
    gt_widths, gt_heights = gt[:, 2:3] - gt[:, 0:1], gt[:, 3:4] - gt[:, 1:2]
    gt_centre_x, gt_centre_y = gt[:, 0:1] + 0.5 * gt_widths, gt[:, 1:2] + 0.5 * gt_heights
    return torch.cat(
        (
            wx * (gt_centre_x - centre_x) / widths,
            wy * (gt_centre_y - centre_y) / heights,
            ww * torch.log(gt_widths / widths),
            wh * torch.log(gt_heights / heights),
        ),
        dim=1,
    )


def decode(coder, deltas, boxes):
    """torchvision's BoxCoder.decode of deltas (M, 4) on boxes (M, 4), as (M, 1, 4), its constants plain numbers."""
    boxes = boxes.to(deltas.dtype)
    wx, wy, ww, wh = coder.weights
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    centre_x, centre_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=coder.bbox_xform_clip)
    x, y = dx * widths[:, None] + centre_x[:, None], dy * heights[:, None] + centre_y[:, None]
    half_width, half_height = 0.5 * (torch.exp(dw) * widths[:, None]), 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((x - half_width, y - half_height, x + half_width, y + half_height), dim=2).flatten(1)[:, None]


def read_levels(pool, features, rois, image_shapes, mask_positions):
    """(levels, [box counts, mask counts]): each sampled region's pyramid level, and how many regions RoIAlign
    pools from each level, for them and (with mask_positions) the mask positives among them, read in one sync;
    the counts [None, None] where pooling needs none."""
    levels = pool.levels(features, rois, image_shapes)
    if not pool.reads_level_counts(features):
        return levels, [None, None]
    parts = [levels] + ([levels[mask_positions]] if mask_positions is not None else [])
    zeros = torch.zeros(len(parts), pool.num_levels, dtype=torch.int64, device=levels.device)
    counts = torch.stack([row.index_add_(0, part, torch.ones_like(part)) for row, part in zip(zeros, parts)])
    counts = counts.tolist()  # the one sync
    return levels, counts + [None] * (2 - len(counts))


def box_losses(class_logits, box_regression, labels, regression_targets):
    """torchvision's fastrcnn_loss, the box term a masked sum over all sampled regions."""
    classification = F.cross_entropy(class_logits, labels)
    num_regions = len(labels)
    own_class = box_regression.reshape(num_regions, -1, 4)[torch.arange(num_regions, device=labels.device), labels]
    box = F.smooth_l1_loss(own_class, regression_targets, beta=1 / 9, reduction="none").sum(1)
    return classification, torch.where(labels > 0, box, 0.0).sum() / num_regions


def mask_loss(mask_logits, boxes, gt_masks, labels, matched_index, per_image):
    """torchvision's maskrcnn_loss for the positives (`per_image` of them in each image, in order)."""
    if not len(labels):
        return mask_logits.sum() * 0
    size = mask_logits.shape[-1]
    targets = [
        project_masks_on_boxes(masks, image_boxes, image_matched, size)
        for masks, image_boxes, image_matched in zip(gt_masks, boxes.split(per_image), matched_index.split(per_image))
    ]
    chosen = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, torch.cat(targets))
