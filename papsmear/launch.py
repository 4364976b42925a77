"""Running under a launcher (`accelerate launch`): which process speaks and writes, and process 0 first.

Also fastai's batch-order broadcast, made to use the process group's own device.
"""
import os

import torch
from fastai.distributed import DistributedDL, rank0_first
from fastai.torch_core import num_distrib, rank_distrib
from fastcore.basics import patch

from papsmear.files import UserError


def rank0_first_or_fail(func, *args, **kwargs):
    """fastai's `rank0_first` (process 0 runs `func` while the others wait, then they run it, reading what it
    wrote) where a `UserError` of process 0 stops every process: process 0 raises it after the wait, and the
    others meet it again, since they check the same files. Without a launcher: `func` once."""
    def caught():
        try:
            return func(*args, **kwargs), None
        except UserError as e:
            return None, e
    result, error = rank0_first(caught)
    if error:
        raise error
    return result


def is_main_process():
    "True in the one process that writes files and prints: rank 0 under a launcher, the only one otherwise."
    return rank_distrib() == 0


def join_launcher():
    """Under a launcher (`accelerate launch`, several processes), put this process on its own GPU before
    any data or model is made; nothing to do in a single process or on CPU."""
    if num_distrib() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


@patch
def _broadcast(self: DistributedDL, t, rank):
    "Broadcast the batch order from `rank` on the process group's own device (fastai's always uses CUDA)."
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(t, dtype=torch.long, device=device)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def describe_batches(batch_size, lr):
    """How a run splits its batches, for the log: under a launcher each of N processes takes `batch_size`
    images per step (fastai's distributed data loader), so the effective batch is N × batch_size; lr is used
    as given (scale it yourself if you want to keep lr per image)."""
    processes = max(num_distrib(), 1)
    if processes == 1:
        return f"batch size {batch_size}, lr {lr:g}"
    return (f"{processes} processes × batch {batch_size} = effective batch {processes * batch_size}, "
            f"lr {lr:g} as given")
