"""torch.distributed, as torchrun starts it: which process this is, and the few collectives training needs."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        """Only the main process writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def start(device_type):
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA); alone otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process()
    process = Process(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(process.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return process


def stop(process):
    if process.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, process, device):
    """The model as training calls it: under DistributedDataParallel when there are several processes."""
    if not process.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def mean_over_processes(values, process):
    """The mean of a tensor over all processes (the tensor itself when alone)."""
    if not process.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / process.world_size


def main_decides(decision, process, device):
    """The main process's `decision` (a bool), on every process: what only it knows, as its evaluations."""
    if not process.distributed:
        return decision
    flag = torch.tensor([int(decision)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
