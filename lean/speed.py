"""How fast a step runs on the hardware at hand: which precision, layout and compilation pay, and the
process-wide settings every entry point makes (configure_process).

Each default follows a measurement; docs/performance.md has the figures.
"""

import ctypes
from dataclasses import dataclass

import torch

from lean.canvas import CANVAS_LEVELS, canvas_ladder
from lean.heads import batch_heads
from lean.internals import cpu_computes_in_bf16, set_recompile_limit

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
COMPILE = ("off", "inductor", "cudagraphs", "graphs")  # graphs: lean.graphs, recorded once the run's batch is known
# Dynamo keeps a graph per input shape: a compiled backbone meets every canvas, at two batch sizes (an
# epoch's last batch may be short).
RECOMPILE_LIMIT = 2 * CANVAS_LEVELS**2


def bf16_is_fast(device):
    """bf16 pays where the hardware computes in it; elsewhere it is emulated, far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_computes_in_bf16()


def channels_last_is_fast(device):
    """On GPUs and on CPUs that compute in bf16 (oneDNN's native layout there); not on an fp32 CPU, where
    oneDNN's channels-last convolution backward is slower (docs/performance.md)."""
    return device.type == "cuda" or bf16_is_fast(device)


def amp_dtype(choice, device):
    """The autocast dtype for --amp `choice` (None: bf16 where it is fast, else off)."""
    if choice is None:
        choice = "bf16" if bf16_is_fast(device) else "off"
    return AMP[choice]


def default_compile(device):
    """Eager everywhere: compiling has not earned back its compile time within the tutorial's 10 epochs,
    on the CPU (inductor) nor on an H100 (CUDA graphs: faster steps, but 32 s of capturing against 7 s
    saved; docs/performance.md). `--compile cudagraphs` pays on longer runs."""
    return "off"


def batched_heads_pay(device):
    """Not measurably, anywhere yet: on an H200 at the tutorial's batch of 2, with 3 host syncs a step instead of
    about 45, the step ran +3 % and -12 % in two runs (it is bound by launching kernels, not by waiting); on a
    2-core CPU -5 % (docs/performance.md). `--batched-heads` keeps them for larger batches."""
    return False


@dataclass(frozen=True)
class Speed:
    """A model's speed settings. `canvases`: pad each batch to one of a few fixed shapes, so that shape-keyed
    work (cuDNN's choice of kernels, a compiled graph) is done once per shape, not per batch."""

    amp: torch.dtype | None = None
    channels_last: bool = False
    compile: str = "off"
    canvases: bool = False
    canvas_levels: int = CANVAS_LEVELS
    batched_heads: bool = False  # lean.heads; off: torchvision's RPN and RoI heads, image by image

    @classmethod
    def for_device(cls, device, amp=None, channels_last=None, compile=None, canvas_levels=None, batched_heads=None):
        """What measured fastest on `device`; any setting given overrides its default."""
        compile = default_compile(device) if compile is None else compile
        return cls(
            amp=amp_dtype(amp, device),
            channels_last=channels_last_is_fast(device) if channels_last is None else channels_last,
            compile=compile,
            canvases=device.type == "cuda" or compile != "off",
            canvas_levels=CANVAS_LEVELS if canvas_levels is None else canvas_levels,
            batched_heads=batched_heads_pay(device) if batched_heads is None else batched_heads,
        )

    def __str__(self):
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp]
        canvases = f"{self.canvas_levels} a side" if self.canvases else "off"
        heads = "batched" if self.batched_heads else "torchvision's"
        return (f"amp {amp}, channels-last {self.channels_last}, compile {self.compile}, canvases {canvases}, "
                f"{heads} heads")  # fmt: skip


def tune_for_speed(model, speed):
    """Apply `speed` to a lean model in place (its state dict keys unchanged) and return it."""
    if speed.batched_heads:
        batch_heads(model)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.transform.channels_last = True
    if speed.canvases:
        transform = model.transform
        transform.canvas_ladder = canvas_ladder(transform.min_size[0], transform.max_size, speed.canvas_levels)
    if speed.compile == "cudagraphs":  # no code generation: the eager kernels, replayed
        model.backbone.compile(backend="cudagraphs", dynamic=False)
    elif speed.compile == "inductor":
        # Inductor lays out a CPU model's convolutions channels-last whatever it is given; told not to,
        # it keeps the layout chosen here.
        model.backbone.compile(dynamic=False, options={"layout_optimization": speed.channels_last})
    return model


def keep_freed_memory(limit=1 << 30):
    """Have glibc's malloc keep up to `limit` bytes of freed memory for reuse, blocks past 32 MiB included;
    False where that failed (not glibc).

    Every batch is new memory, and a training step's largest tensors are tens of MiB; with glibc's
    defaults freed blocks go back to the operating system and the next ones fault their pages in
    afresh. A process-wide setting, as preloading jemalloc would be: the entry points make it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # from glibc's malloc.h
    largest_heap_block = 32 << 20  # glibc's ceiling for the mapping threshold; past it, mapping must be off
    return (
        bool(libc.mallopt(m_mmap_threshold, largest_heap_block))
        and bool(libc.mallopt(m_trim_threshold, limit))
        and bool(libc.mallopt(m_mmap_max, 0))
    )


def configure_process():
    """The process-wide settings every entry point makes, in one place: glibc keeps freed batches and step tensors
    for reuse instead of faulting them in afresh, and dynamo keeps a graph per canvas of a compiled backbone."""
    keep_freed_memory()
    set_recompile_limit(RECOMPILE_LIMIT)
