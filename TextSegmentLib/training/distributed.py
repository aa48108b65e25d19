"""Distributed data parallel through PyTorch's own engine, started by ``torchrun``.

``torchrun --nproc-per-node N -m TextSegmentLib train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``; without them everything here is a no-op and training runs in one
process. gloo on the CPU, NCCL on CUDA (with gloo beside it for the CPU values: logged losses,
samplers). Each rank samples its own batches (seed + rank); rank 0 alone validates, plots and
writes checkpoints, which hold every rank's sampler.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared (once); a plain run gets a single-process ``DistInfo``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # NCCL carries CUDA tensors only; the losses averaged for the log, the stop decision and the
        # samplers gathered for the checkpoint are CPU values, which gloo carries beside it
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d joined the process group (%s)", info.rank, world, dist.get_backend())
    return info


def wrap(module: torch.nn.Module, info: DistInfo, *, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` when distributed; the module itself otherwise."""
    if not info.enabled:
        return module
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def mean_across(value: float, info: DistInfo) -> float:
    """The mean of a scalar over ranks (for logging losses)."""
    if not info.enabled:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def any_across(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on any: one decision that every rank acts on together."""
    return mean_across(1.0 if flag else 0.0, info) > 0


def gather_objects(value: object, info: DistInfo) -> list:
    """Every rank's ``value`` (picklable, e.g. torch's RNG state tensors), in rank order, on every rank."""
    if not info.enabled:
        return [value]
    values: list = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
