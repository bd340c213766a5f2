"""DistributedDataParallel helpers: set up from ``torchrun``'s environment, wrap, synchronise.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` starts the process group from them (NCCL on CUDA, gloo on CPU). In a
single process every helper is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: str = "auto") -> bool:
    """Start the process group when launched by torchrun; return whether this call started it."""
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_nccl = torch.cuda.is_available() and str(device).split(":")[0] in ("auto", "cuda")
    backend = "nccl" if use_nccl else "gloo"
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    return True


def cleanup() -> None:
    """Destroy the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_device(device: torch.device) -> torch.device:
    """Under DDP on CUDA, this process's GPU (``cuda:LOCAL_RANK``); otherwise ``device``."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap ``module`` when distributed (unused parameters allowed: heads and decoders vary by task)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (identity without a process group)."""
    if not is_distributed():
        return value
    # NCCL moves CUDA tensors only; gloo takes CPU tensors
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=on)
    dist.broadcast(t, src=0)
    return float(t.item())
