"""RoIAlign on the CPU as one sparse matrix product: several times torchvision's CPU kernel, same numbers.

Each pooled value is a fixed weighted sum of at most 4 x sampling_ratio**2 feature pixels (bilinear
weights at a grid of sample points), the same for every channel. So pooling every region from every
pyramid level is one product of a sparse (regions x bins, pixels) weight matrix with the feature
maps laid out as a (pixels, channels) matrix (for channels-last maps, a view); its gradient is the
transposed product. torchvision's CPU kernel walks the regions one at a time on one core and, in the
backward pass, recomputes the weights for every channel: a large share of a CPU step
(docs/performance.md). On CUDA torchvision's kernel stays, with the regions
grouped by level after one host sync, where torchvision's loop makes one a level (none where lean.heads read
the counts already).
"""

import warnings

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from lean.internals import feature_maps_named, pyramid_scales, rois_in_roi_format


class SparseRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same arguments, same results); on the CPU, computed as a sparse product."""

    by_level = None  # torchvision's kernel level by level (None: on a GPU only), else the sparse product

    @classmethod
    def like(cls, pool):
        return cls(
            pool.featmap_names,
            pool.output_size,
            pool.sampling_ratio,
            canonical_scale=pool.canonical_scale,
            canonical_level=pool.canonical_level,
        )

    @property
    def num_levels(self):
        return len(self.featmap_names)

    def forward(self, x, boxes, image_shapes):
        if self.sampling_ratio <= 0:  # adaptive sampling: a region's sample count is its own
            return super().forward(x, boxes, image_shapes)
        rois = rois_in_roi_format(boxes)
        return self.pool(x, rois, image_shapes, self.levels(x, rois, image_shapes))

    def pool(self, x, rois, image_shapes, levels, level_counts=None):
        """Each region of rois (R x [image index, x0, y0, x1, y1]) pooled from its level (`levels`);
        `level_counts`, the regions on each level where the caller has read them already (the by-level path
        reads them otherwise)."""
        features = self._maps(x, image_shapes)
        if self._pools_by_level(features[0]):
            return roi_align_by_level(
                features, rois, levels, self.scales, self.output_size, self.sampling_ratio, level_counts
            )
        return pyramid_roi_align(features, rois, levels, self.scales, self.output_size, self.sampling_ratio)

    def levels(self, x, rois, image_shapes):
        """Each region's pyramid level, as torchvision's level mapper assigns them."""
        features = self._maps(x, image_shapes)
        if len(features) == 1:
            return torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        return self.map_levels([rois[:, 1:]])

    def reads_level_counts(self, x):
        """Whether pooling needs each level's region count on the host."""
        return self.num_levels > 1 and self._pools_by_level(x[self.featmap_names[0]])

    def _pools_by_level(self, feature):
        return feature.device.type != "cpu" if self.by_level is None else self.by_level

    def _maps(self, x, image_shapes):
        features = feature_maps_named(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = pyramid_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        return features


def roi_align_by_level(features, rois, levels, scales, output_size, sampling_ratio, counts=None):
    """torchvision's RoIAlign of each region from its level, the regions sorted by level so that one host
    sync (the count per level, unless given) splits them; returns them in their own order, in the maps' dtype.
    The order is restored by a gather, whose backward is a plain scatter."""
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, scales[0], sampling_ratio).to(features[0].dtype)
    order = torch.argsort(levels, stable=True)
    if counts is None:
        counts = torch.bincount(levels, minlength=len(features)).tolist()
    pooled = [
        roi_align(feature, part, output_size, scale, sampling_ratio)
        for feature, scale, part in zip(features, scales, torch.split(rois[order], counts))
    ]
    return torch.cat(pooled).index_select(0, torch.argsort(order)).to(features[0].dtype)


def pyramid_roi_align(features, rois, levels, scales, output_size, sampling_ratio, aligned=False):
    """RoIAlign of each region (rois: R x [image index, x0, y0, x1, y1]) from its level's N x C x H x W map.

    Equals torchvision.ops.roi_align(features[level], ..., spatial_scale=scales[level]) region by region.
    Computes in float32, as torchvision's autocast rule for roi_align does, and returns the maps' dtype.
    """
    channels, dtype = features[0].shape[1], features[0].dtype
    pixels = [f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]  # a view where channels-last
    pixels = (pixels[0] if len(pixels) == 1 else torch.cat(pixels)).float()
    heights = torch.tensor([f.shape[2] for f in features])[levels]
    widths = torch.tensor([f.shape[3] for f in features])[levels]
    level_starts = torch.tensor([0] + [f.shape[0] * f.shape[2] * f.shape[3] for f in features]).cumsum(0)[levels]
    scale = torch.tensor(scales, dtype=torch.float32)[levels]
    weights = sampling_matrix(
        rois.float(), scale, heights, widths, level_starts, len(pixels), output_size, sampling_ratio, aligned
    )
    with torch.autocast("cpu", enabled=False):  # the product in float32, whatever autocast is on
        pooled = weights @ pixels  # (regions x bins, channels)
    pooled = pooled.reshape(len(rois), *output_size, channels).permute(0, 3, 1, 2)
    # In the maps' memory format: a contiguous model's heads would otherwise run channels-last, and their 1 x 1
    # convolutions' gradients would come back in strides DDP's buckets do not expect.
    layout = (
        torch.channels_last if features[0].is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    )
    return pooled.to(dtype).contiguous(memory_format=layout)


def sampling_matrix(rois, scale, heights, widths, level_starts, num_pixels, output_size, sampling_ratio, aligned=False):
    """The sparse (R x PH x PW, num_pixels) matrix of RoIAlign's weights, row r * PH * PW + ph * PW + pw for bin
    (ph, pw) of region r; a pixel's column is its level's start + (n * H + y) * W + x.

    Per region: `scale`, its level's `heights` and `widths`, and `level_starts`, all R-vectors. The sample
    points, their clamping at the borders and the 1/count average are torchvision's CPU kernel's.
    """
    pooled_height, pooled_width = output_size
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (rois[:, k] * scale - offset for k in range(1, 5))
    width, height = x1 - x0, y1 - y0
    if not aligned:  # torchvision's legacy behaviour: a region is at least one pixel
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    rows_at, row_weights = _axis_samples(y0, height, pooled_height, heights, sampling_ratio)  # R x PH x S x 2
    cols_at, col_weights = _axis_samples(x0, width, pooled_width, widths, sampling_ratio)  # R x PW x S x 2
    image_starts = level_starts + rois[:, 0].long() * heights * widths
    # Broadcast to R x PH x PW x S x S x 2 x 2: bin row and column, sample row and column, y and x neighbour.
    along_y = (slice(None), slice(None), None, slice(None), None, slice(None), None)
    along_x = (slice(None), None, slice(None), None, slice(None), None, slice(None))
    per_region = (slice(None),) + (None,) * 6
    columns = image_starts[per_region] + rows_at[along_y] * widths[per_region] + cols_at[along_x]
    values = row_weights[along_y] * col_weights[along_x] / sampling_ratio**2
    bins = len(rois) * pooled_height * pooled_width
    per_bin = 4 * sampling_ratio**2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            torch.arange(bins + 1) * per_bin,
            columns.reshape(-1),
            values.reshape(-1),
            size=(bins, num_pixels),
            check_invariants=False,
        )


def _axis_samples(start, length, bins, size, sampling_ratio):
    """Along one axis: the two neighbouring pixel indices of each sample point and their bilinear weights,
    each R x bins x sampling_ratio x 2, with torchvision's border rules (a point more than a pixel
    outside weighs nothing; one within a pixel of the border is clamped onto it)."""
    bin_length = (length / bins)[:, None, None]
    k = torch.arange(bins, dtype=torch.float32)[None, :, None]
    i = torch.arange(sampling_ratio, dtype=torch.float32)[None, None, :]
    at = start[:, None, None] + k * bin_length + (i + 0.5) * bin_length / sampling_ratio
    size = size.to(torch.float32)[:, None, None]
    inside = (at >= -1.0) & (at <= size)
    at = at.clamp(min=0.0)
    low = at.floor()
    last = size - 1
    at_last = low >= last
    low = torch.where(at_last, last, low)
    at = torch.where(at_last, low, at)
    high = torch.where(at_last, low, low + 1)
    fraction = at - low
    weights = torch.stack([1 - fraction, fraction], -1) * inside[..., None]
    return torch.stack([low, high], -1).long(), weights
