"""A run's writing done off the training thread: checkpoints and curves written by one worker, in order.

The training thread snapshots what a job needs (a checkpoint's tensors copied off the device, into pinned
memory on a GPU) and goes on training while the worker writes. `wait()` joins what is queued and raises
the first failure there, in the training thread: before the next checkpoint is written, and at the end.
"""

from concurrent.futures import ThreadPoolExecutor

import torch


class Writer:
    """Runs jobs one at a time in a background thread, in the order submitted; a context manager that joins
    them all on the way out."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lean-writer")
        self.queued = []

    def submit(self, job):
        self.queued.append(self.executor.submit(job))

    def wait(self):
        """Block until every job submitted has run; raise the first one's error, if any."""
        queued, self.queued = self.queued, []
        for future in queued:
            future.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        try:
            if exc_info[0] is None:
                self.wait()
            else:  # already failing: let the jobs finish, keep the first error
                for future in self.queued:
                    future.exception()
        finally:
            self.executor.shutdown(wait=True)


def snapshot(state):
    """`state` (nested dicts, lists and tuples of tensors and values) with every tensor copied to the host, as it
    is now: the copies from a GPU go to pinned memory without waiting, one sync at the end."""
    copies_from_device = False

    def copy(value):
        nonlocal copies_from_device
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                return value.detach().clone()
            copies_from_device = True
            host = torch.empty_like(value, device="cpu", pin_memory=True)
            return host.copy_(value.detach(), non_blocking=True)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    copied = copy(state)
    if copies_from_device:
        torch.cuda.synchronize()
    return copied
