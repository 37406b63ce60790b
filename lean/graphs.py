"""The backbone and the RPN head replayed as CUDA graphs, one pair per canvas, recorded before the first step
(--compile graphs).

A small batch's step on a GPU is bound by the host launching kernels (docs/performance.md); a graph
launches a part's forward or its backward in one call. torch.cuda.make_graphed_callables records each
canvas's backbone and RPN head together, forwards in the order a step runs them and backwards in reverse,
on blank images after warm-up passes; every canvas goes into one memory pool, as only one canvas runs in a
step. Nothing is traced: the recorded kernels are the eager ones. The warm-up passes move live BatchNorm
statistics, which are put back. A batch of another shape (an epoch's short last batch, a canvas past the
ladder), evaluation, validation losses and a CPU run the parts eagerly.
"""

import time

import torch


def capture_graphs(model, batch_size, amp):
    """Record `model`'s backbone and RPN head (a lean model on CUDA with a canvas ladder) for every canvas at
    `batch_size` under autocast `amp`, and route training steps of those shapes through them. Returns (graphs
    recorded, seconds); (0, 0.0) where the model is not on CUDA or pads to no canvases: it stays eager."""
    ladder = model.transform.canvas_ladder
    device = next(model.parameters()).device
    if device.type != "cuda" or not ladder:
        return 0, 0.0
    start = time.perf_counter()
    layout = torch.channels_last if model.transform.channels_last else torch.contiguous_format
    kept = {name: value.clone() for name, value in model.named_buffers()}
    was_training = model.training
    model.train()
    pool = torch.cuda.graph_pool_handle()
    backbone_graphs, head_graphs = {}, {}
    for height in ladder:
        for width in ladder:
            images = torch.zeros((batch_size, 3, height, width), device=device).contiguous(memory_format=layout)
            with _autocast(amp):
                with torch.no_grad():
                    features = list(model.backbone(images).values())  # the head's inputs: their shapes and layout
                maps = [feature.clone().requires_grad_() for feature in features]
                backbone, head = torch.cuda.make_graphed_callables(
                    (_Part(model.backbone), _Part(model.rpn.head)), ((images,), (maps,)), pool=pool
                )
            backbone_graphs[_image_key(images, amp)] = backbone
            head_graphs[_maps_key(maps, amp)] = head
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(kept[name])  # in place: the graphs read these very tensors
    model.train(was_training)
    _route(model.backbone, backbone_graphs, _image_key)
    _route(model.rpn.head, head_graphs, _maps_key)
    torch.cuda.synchronize(device)
    return len(backbone_graphs) + len(head_graphs), time.perf_counter() - start


class _Part(torch.nn.Module):
    """A part of the model as make_graphed_callables takes it, which replaces the forward of the module it is
    given: this one's, so that the part itself stays eager for what the graphs do not cover."""

    def __init__(self, part):
        super().__init__()
        self.part = part

    def forward(self, inputs):
        return self.part(inputs)


def _autocast(amp):
    # make_graphed_callables refuses autocast's cache of cast weights; a graph casts them as it replays.
    return torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False)


def _image_key(images, amp):
    return "images", tuple(images.shape), images.dtype, images.is_contiguous(memory_format=torch.channels_last), amp


def _maps_key(maps, amp):
    return "maps", tuple(tuple(m.shape) for m in maps), maps[0].dtype, amp


def _route(module, graphs, key_of):
    """Have `module` replay the graph recorded for its input's shape in a training step, eager otherwise."""
    eager = module.forward

    def forward(inputs):
        if not (module.training and torch.is_grad_enabled()):
            return eager(inputs)
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        graphed = graphs.get(key_of(inputs, amp))
        if graphed is None:
            return eager(inputs)
        with _autocast(amp):
            return graphed(inputs)

    module.forward = forward  # an instance attribute: the state dict and the module tree stay as they were
