"""The only module that knows about ranks.

``Distributed.from_env`` reads the launcher's environment (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns an object whose
methods are no-ops in a single process, so the training loop never branches on it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import DistributedConfig

log = logging.getLogger(__name__)


def pick_device(device: str, local_rank: int) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is present, else the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "launch at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, cfg: DistributedConfig, device: str) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.strategy == "single" and world_size > 1:
            raise RuntimeError(
                f"distributed.strategy=single but the launcher started {world_size} ranks; "
                "use strategy auto or ddp, or launch one process"
            )
        torch_device = pick_device(device, local_rank)
        if world_size > 1 and not dist.is_initialized():
            backend = cfg.backend
            if backend == "auto":
                backend = "nccl" if torch_device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(minutes=30),
                device_id=torch_device if torch_device.type == "cuda" else None,
            )
            log.info("rank %d/%d on %s (%s)", rank, world_size, torch_device, backend)
        return cls(rank, world_size, local_rank, torch_device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP when several ranks run (it broadcasts rank 0's parameters and buffers)."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks (returns the tensor)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj: object) -> list[object]:
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def replica_digests(self, model: nn.Module) -> list[str]:
        """Every rank's SHA-256 of its parameters, in rank order. Data parallelism keeps
        replicas bit-identical; a difference means ranks diverged (a bug, not noise)."""
        digest = hashlib.sha256()
        for name, param in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return [str(d) for d in self.all_gather_object(digest.hexdigest())]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
