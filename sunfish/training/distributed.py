"""torch.distributed for the training loop: one process per device, launched by torchrun.

The loop stays the same with one process or many. ``train.batch_size`` is the *global* micro-batch:
every rank draws the same global batch from the same seeded generator and keeps its own rows, so a
run's data order, loss and resume state do not depend on the world size, and a resume checkpoint
written with 4 processes continues with 1 (or 8). Gradients are averaged by DistributedDataParallel;
only rank 0 writes checkpoints, progress files and MLflow records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

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


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        import atexit

        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        atexit.register(shutdown)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    log.info("distributed: rank %d of %d (%s)", info.rank, info.world_size, dist.get_backend())
    return info


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(batch: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """This rank's contiguous share of a global batch (every tensor has the batch dimension first)."""
    if not info.enabled:
        return batch
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            rows = value.shape[0]
            if rows % info.world_size:
                raise ValueError(
                    f"train.batch_size={rows} is the global batch and must be divisible by the "
                    f"{info.world_size} processes; change train.batch_size or --nproc_per_node"
                )
            per = rows // info.world_size
            value = value[info.rank * per : (info.rank + 1) * per]
        out[key] = value
    return out


def sum_across(values: Iterable[float], info: DistInfo, device: torch.device) -> list[float]:
    values = [float(v) for v in values]
    if not info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


class LossModule(torch.nn.Module):
    """Routes DistributedDataParallel's forward to ``model.training_loss`` so gradient sync is armed."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return self.model.training_loss(batch)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # stages carry zero-initialised branches some batches may not reach; unused parameters are allowed
    return DistributedDataParallel(LossModule(model), device_ids=ids, find_unused_parameters=True)
