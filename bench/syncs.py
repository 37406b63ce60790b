"""Host-device syncs counted on any device, the CPU included: what torch.cuda.set_sync_debug_mode reports on a GPU.

Every sync a PyTorch program makes comes from a few operations: a scalar read (`.item()`, `int(t)`, `if t:`),
an operation whose output size depends on the data (`nonzero`, `masked_select`, boolean-mask indexing,
`unique`, `bincount`, `repeat_interleave` without an output size, torchvision's NMS), a copy to the host
(`.tolist()`, `.numpy()`, `.cpu()`, a host tensor's `copy_` from the device), or a tensor made on the
device from host data (`torch.tensor(..., device=)`, `new_tensor`, a host tensor's `.to(device)`: a pageable
copy that waits). `count_syncs()` watches for them as they are dispatched,
so a CPU run counts the syncs the same code would make on a GPU, by operation and by the Python line that asked.

On the CPU every tensor is on the host, so the counter tells apart the tensors a GPU run would keep there:
those made without a device named (`torch.empty(1)`, `torch.tensor([...])`) and whatever is computed from
them alone. Reading one of those makes no sync; reading anything else (the model's inputs and weights, what
is made with `device=`, and what is computed from any of them) does.
"""

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
READS = {  # operations that sync whatever their arguments
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.bincount,
    aten.equal,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # sync with a boolean index
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
FROM_HOST = {torch.tensor, torch.as_tensor}  # sync when given host data and a device
WRAPPERS = (  # frames skipped when naming the line that asked: torch's own, and torchvision's autocast shims
    str(Path(torch.__file__).parent) + "/",
    str(Path(torchvision.__file__).parent / "_autograd_registrations.py"),
    __file__,
)


class SyncCount:
    """Syncs seen: by operation, by 'folder/file:line' of the first frame outside torch, and in all."""

    def __init__(self):
        self.by_op = Counter()
        self.by_line = Counter()
        self.host = WeakIdKeyDictionary()  # the tensors a GPU run would hold on the host

    @property
    def total(self):
        return sum(self.by_op.values())

    def add(self, op):
        self.by_op[op] += 1
        self.by_line[_asking_line()] += 1

    def on_device(self, tensors):
        return any(t not in self.host for t in tensors)

    def mark_host(self, outputs):
        for tensor in _tensors(outputs):
            self.host[tensor] = True


def _tensors(tree):
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _asking_line():
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(WRAPPERS):
        frame = frame.f_back
    if frame is None:
        return "<autograd>"  # a backward operation: no Python frame asked for it
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_lineno}"


def _syncs(func, args, kwargs):
    """Whether the dispatched `func` syncs when its tensors are on the device."""
    packet = func.overloadpacket
    if packet in READS:
        return True
    if packet in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        masks = [i for i in indices if i is not None and i.dtype in (torch.bool, torch.uint8)]
        filled = packet is not aten.index and len(indices) == 1 and args[2].dim() == 0  # becomes a masked_fill_
        return bool(masks) and not filled
    if packet is aten.repeat_interleave:
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
    return func.namespace == "torchvision" and packet.__name__ == "nms"


class _Dispatched(TorchDispatchMode):
    def __init__(self, count):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        copied_to_host = func.overloadpacket is aten.copy_ and args[0] in self.count.host
        if self.count.on_device(inputs) and (_syncs(func, args, kwargs) or copied_to_host):
            self.count.add(func.name())
        outputs = func(*args, **kwargs)
        if inputs and not self.count.on_device(inputs):
            self.count.mark_host(outputs)
        return outputs


def _moves_host_to_device(count, args, kwargs):
    """Whether `tensor.to(...)` copies a host tensor to the compute device, waiting: a device named by a
    torch.device or a tensor (code moving to the host says "cpu"), the copy not asked to be non-blocking."""
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    moves = isinstance(target, (torch.device, torch.Tensor))
    return moves and args[0] in count.host and not kwargs.get("non_blocking", False)


class _Called(TorchFunctionMode):
    def __init__(self, count):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        if func in HOST_COPIES and self.count.on_device(inputs):
            self.count.add(f"Tensor.{func.__name__}")
        elif func in FROM_HOST and kwargs.get("device") is not None and not inputs:
            self.count.add(f"torch.{func.__name__}(host data, device=...)")
        elif func is torch.Tensor.new_tensor and not isinstance(args[1], torch.Tensor) and self.count.on_device(inputs):
            self.count.add("Tensor.new_tensor(host data)")
        elif func is torch.Tensor.to and _moves_host_to_device(self.count, args, kwargs):
            self.count.add("Tensor.to(a device) of a host tensor")
        outputs = func(*args, **kwargs)
        if not inputs and kwargs.get("device") is None:  # made on the host: torch.empty(1), torch.tensor([...])
            self.count.mark_host(outputs)
        return outputs


@contextmanager
def count_syncs():
    """Within the block, count the syncs its operations would make on a GPU; yields the SyncCount."""
    count = SyncCount()
    with _Called(count), _Dispatched(count):
        yield count
