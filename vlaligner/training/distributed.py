"""Where this process sits in a run (torchrun's variables), and the few collectives training needs.

Axis legend: none (no tensors with named axes here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
from torch import nn

__all__ = ["DistEnv", "unwrap_model", "dist_ready", "init_distributed", "barrier", "all_gather_objects", "mean_over_processes"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly one-process) run, read from torchrun's variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by ``torchrun``); default one process."""
        env = os.environ if environ is None else environ

        def _int(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None

        world = _int("WORLD_SIZE", 1)
        rank = _int("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=_int("LOCAL_RANK", rank))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def dist_ready() -> bool:
    """True inside an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group of a torchrun launch (NCCL on CUDA, Gloo on CPU); no-op alone."""
    if not env.distributed or dist_ready():
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def barrier(env: DistEnv) -> None:
    """Wait for every process (no-op alone)."""
    if env.distributed and dist_ready():
        torch.distributed.barrier()


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every process's ``obj``, in rank order (a collective: call it on all ranks)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def mean_over_processes(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over processes (itself alone)."""
    if env.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        value /= env.world_size
    return value
