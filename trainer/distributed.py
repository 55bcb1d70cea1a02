"""The only module that knows about ranks.

``Distributed.from_env`` reads the launcher's environment (``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns an object whose
methods are no-ops in a single process, so the training loop never branches on it.

``Distributed.engine`` wraps the SAE and its optimiser for the configured strategy:

- ``LocalEngine``: one process, or DDP (every rank holds everything; gradients all-reduced).
- ``ZeroEngine``: DeepSpeed ZeRO. Stage 1 partitions the optimiser state (and fp32 master
  weights) over ranks, stage 2 also the gradients, stage 3 also the parameters, which are
  gathered for the forward and backward passes and released afterwards.

Both keep the decoder constraint of the recipe. The gradient projection happens in the graph
(``trainer.sae.tangent_grad``), before any reduction. The renormalisation after each step needs
whole rows, which ZeRO's flat partitions cut anywhere: ``ZeroEngine`` computes each row's norm
from the pieces every rank holds (one all-reduce of F floats) and rescales its own piece.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import yaml
from patchsae.kernels import SAEOutput
from patchsae.trainer.config import ConfigError, DistributedConfig
from patchsae.trainer.sae import SparseAutoencoder
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

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


@dataclass(frozen=True)
class AdamSchedule:
    """The optimiser every strategy uses: Adam, with ``lr`` scaled by ``lr_lambda(step)``.

    Adam is torch's fused implementation, the one that can skip a step on the device: given
    ``found_inf`` (see ``skip_if``) it leaves the weights, the moments and the step count as
    they are, with no host sync.
    """

    lr: float
    betas: tuple[float, float]
    lr_lambda: Callable[[int], float]

    def optimizer(self, params: Any) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, fused=True)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)

    def load_scheduler(self, scheduler: Any, state: dict[str, Any]) -> None:
        """The schedule's position from a checkpoint, its base rate from this run's config, so
        that a run resumed with another ``train.lr`` (after it diverged, say) uses that."""
        scheduler.load_state_dict(state)
        scheduler.base_lrs = [self.lr] * len(scheduler.base_lrs)
        factor = self.lr_lambda(scheduler.last_epoch)
        for group in scheduler.optimizer.param_groups:
            group["lr"] = self.lr * factor
        scheduler._last_lr = [self.lr * factor] * len(scheduler.base_lrs)


def skip_if(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """Make the next ``optimizer.step()`` a no-op where ``skip`` (a device bool) is true.

    torch's fused Adam reads ``found_inf`` (what ``GradScaler`` sets) on the device. Other
    optimisers (DeepSpeed's own, ``distributed.fused_optimizer``) do not; DeepSpeed skips a
    step with a non-finite gradient norm itself."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]


def grad_norm(params: Any) -> Tensor:
    """The global L2 norm of the gradients, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"
    """The resolved strategy: ``single``, ``ddp`` or ``deepspeed``."""

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
        strategy = cfg.strategy
        if strategy == "auto":
            strategy = "ddp" if world_size > 1 else "single"
        torch_device = pick_device(device, local_rank)
        if strategy == "deepspeed" and world_size == 1 and not dist.is_initialized():
            # ZeRO on one rank (optimiser offload) still needs a process group.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        needs_group = world_size > 1 or strategy == "deepspeed"
        if needs_group and not dist.is_initialized():
            backend = cfg.backend
            if backend == "auto":
                backend = "nccl" if torch_device.type == "cuda" else "gloo"
            global _group_used
            _group_used = True
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(minutes=30),
                device_id=torch_device if torch_device.type == "cuda" else None,
            )
            log.info("rank %d/%d on %s (%s)", rank, world_size, torch_device, backend)
        return cls(rank, world_size, local_rank, torch_device, strategy)

    def engine(
        self,
        sae: SparseAutoencoder,
        cfg: DistributedConfig,
        adam: AdamSchedule,
        *,
        local_tokens: int,
    ) -> Engine:
        """The SAE with its optimiser and schedule, laid out for the configured strategy."""
        if self.strategy == "deepspeed":
            return ZeroEngine(self, sae, cfg, adam, local_tokens=local_tokens)
        return LocalEngine(self, sae, adam)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks (returns the tensor)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def replica_digests(self, tensors: dict[str, Tensor]) -> list[str]:
        """Every rank's SHA-256 of ``tensors`` (its view of the full weights), in rank order.
        Data parallelism keeps replicas bit-identical; a difference means ranks diverged (a bug,
        not noise)."""
        digest = hashlib.sha256()
        for name, param in sorted(tensors.items()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return [str(d) for d in self.all_gather_object(digest.hexdigest())]

    def progress(self, what: str, initial: int = 0) -> Any:
        """A tqdm bar of images for a pass over the shards, shown by the main rank only (every
        10 s when stderr is not a terminal, e.g. a job's log)."""
        from tqdm import tqdm

        return tqdm(
            total=None,
            initial=initial,
            unit="img",
            desc=f"{what} (rank {self.rank}/{self.world_size})",
            disable=not self.is_main,
            mininterval=1.0 if sys.stderr.isatty() else 10.0,
            file=sys.stderr,
        )

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that has used a process group, skipping the interpreter's finalisation.

    Gloo's worker threads release a finished collective only after the caller has seen it
    complete. A collective whose tensors were created in Python (``all_gather_object``'s, a
    barrier that still holds the collectives before it) then decrefs them, which takes the GIL.
    When the main thread has meanwhile begun finalising the interpreter, Python ends that
    thread inside a C++ destructor and the process aborts (SIGABRT, "terminate called without
    an active exception") after all its work is done, so torchrun reports a failed rank. Seen
    about once in 40 two-rank runs on a loaded machine (core dump: ``~AsyncBarrierWork`` ->
    ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``).
    ``destroy_process_group`` does not join gloo's threads (torch 2.14), so the only way around
    is not to finalise: flush what Python buffers, then ``os._exit``.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def used_process_group() -> bool:
    """Whether this process has initialised a process group (destroyed or not)."""
    return _group_used


_group_used = False


def _tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs of a training layout of the SAE (its parameters, gradients and
    optimiser state): :class:`LocalEngine` (one process, DDP) and :class:`ZeroEngine`
    (DeepSpeed ZeRO 1-3) implement it."""

    sae: SparseAutoencoder

    @property
    def kind(self) -> str:
        """``single``, ``ddp`` or ``deepspeed/zero<stage>``: what ``distributed/engine`` logs."""
        ...

    def forward(self, x_ND: Tensor, **kwargs: Any) -> SAEOutput:
        """The SAE's forward (through DDP or DeepSpeed where they wrap it)."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Gradients of ``loss`` (reduced over ranks as the layout needs)."""
        ...

    def step(self, skip: Tensor) -> Tensor:
        """Optimiser and schedule step, decoder rows renormalised; skipped (weights and Adam
        state untouched) where ``skip`` is set or the gradient norm is not finite, decided on
        the device. Returns whether it was skipped."""
        ...

    def lr(self) -> float: ...

    def grad_norm(self) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        """What ``state.pt`` holds of the engine (rank 0 writes it)."""
        ...

    def save_shards(self, folder: Path) -> None:
        """Write the partitioned state into a checkpoint folder (a collective; may be a no-op)."""
        ...

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore from a checkpoint that passed ``checkpoint.check_layout``."""
        ...

    def full_tensors(self) -> dict[str, Tensor]:
        """The whole SAE in the export layout (a collective under ZeRO: every rank calls)."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes of training state this rank holds: params, master, optimizer, grads."""
        ...


class LocalEngine:
    """One process, or DDP: every rank holds the whole SAE, its gradients and Adam state."""

    def __init__(
        self,
        dist_: Distributed,
        sae: SparseAutoencoder,
        adam: AdamSchedule,
    ) -> None:
        self.dist, self.sae, self.adam = dist_, sae, adam
        self.optimizer = adam.optimizer(sae.parameters())
        self.scheduler = adam.scheduler(self.optimizer)
        self.module: nn.Module = sae
        if dist_.active:  # DDP broadcasts rank 0's parameters and buffers
            ids = [dist_.device.index] if dist_.device.type == "cuda" else None
            self.module = DistributedDataParallel(sae, device_ids=ids)

    @property
    def kind(self) -> str:
        return self.dist.strategy

    def forward(self, x_ND: Tensor, **kwargs: Any) -> SAEOutput:
        return self.module(x_ND, **kwargs)

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, skip: Tensor) -> Tensor:
        """Optimiser step, schedule step, decoder rows back to unit norm; a step whose gradient
        norm is not finite, or where ``skip`` is set, leaves the weights and Adam state
        untouched (decided on the device). Returns whether it was skipped."""
        self._grad_norm = grad_norm(self.sae.parameters())
        skip = skip | ~torch.isfinite(self._grad_norm)
        skip_if(self.optimizer, skip)
        self.optimizer.step()
        self.scheduler.step()
        self.sae.normalize_decoder(keep=~skip)
        return skip

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float:
        return float(self._grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """For ``state.pt`` (written by rank 0: every rank holds the same state)."""
        return {
            "sae": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def save_shards(self, folder: Path) -> None:
        """Nothing is partitioned: ``state_dict`` holds it all."""

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore from a checkpoint that passed :func:`checkpoint.check_layout`."""
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.adam.load_scheduler(self.scheduler, state["scheduler"])

    def full_tensors(self) -> dict[str, Tensor]:
        """This rank's whole SAE (export layout); a collective under ZeRO, so every rank calls."""
        return self.sae.export_tensors()

    def memory(self) -> dict[str, int]:
        """Bytes of SAE training state this rank holds."""
        params = list(self.sae.parameters())
        return {
            "params": _tensor_bytes(params),
            "master": 0,
            "optimizer": _tensor_bytes(_optimizer_state_tensors(self.optimizer)),
            "grads": _tensor_bytes(p.grad for p in params),
        }


def deepspeed_config(
    cfg: DistributedConfig,
    *,
    local_tokens: int,
    world_size: int,
    lr: float,
    betas: tuple[float, float],
    cuda: bool,
) -> dict[str, Any]:
    """The DeepSpeed config generated from ours, with ``cfg.deepspeed_config`` merged over it."""
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "reduce_bucket_size": cfg.reduce_bucket_size,
        "contiguous_gradients": True,
        "overlap_comm": cuda,
    }
    if cfg.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = cfg.prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = cfg.param_persistence_threshold
    else:
        zero["allgather_bucket_size"] = cfg.allgather_bucket_size
        zero["reduce_scatter"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": local_tokens,
        "gradient_accumulation_steps": 1,
        "train_batch_size": local_tokens * world_size,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.fused_optimizer:
        out["optimizer"] = {
            "type": "Adam",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "adam_w_mode": False,
            },
        }
    if cfg.deepspeed_config:
        try:  # YAML reads JSON too
            override = yaml.safe_load(Path(cfg.deepspeed_config).read_text())
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config error at 'distributed.deepspeed_config': {cfg.deepspeed_config} is "
                f"not valid JSON or YAML ({err}); fix the file"
            ) from err
        if not isinstance(override, dict):
            raise ConfigError(
                f"config error at 'distributed.deepspeed_config': {cfg.deepspeed_config} must "
                "hold a mapping of DeepSpeed settings"
            )
        out = _merge(out, override)
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _import_deepspeed(device: torch.device) -> Any:
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - deepspeed is a dependency
        raise ConfigError(
            "distributed.strategy=deepspeed needs the deepspeed package; pip install deepspeed "
            "(see constraints.txt for the tested version)"
        ) from err
    return deepspeed


class ZeroEngine:
    """DeepSpeed ZeRO stage 1, 2 or 3 around the SAE (fp32 training).

    The client optimiser is ``torch.optim.Adam`` unless ``fused_optimizer``; DeepSpeed runs it on
    each rank's flat fp32 partition. The schedule is ours (``LambdaLR`` on that optimiser's
    groups), stepped after DeepSpeed's step, so every strategy follows the same schedule.
    """

    TAG = "zero"
    """Sub-folder of a checkpoint holding DeepSpeed's partitioned files."""

    def __init__(
        self,
        dist_: Distributed,
        sae: SparseAutoencoder,
        cfg: DistributedConfig,
        adam: AdamSchedule,
        *,
        local_tokens: int,
    ) -> None:
        ds = _import_deepspeed(dist_.device)
        self.dist, self.sae, self.cfg, self.adam = dist_, sae, cfg, adam
        self.stage = cfg.zero_stage
        self.config = deepspeed_config(
            cfg,
            local_tokens=local_tokens,
            world_size=dist_.world_size,
            lr=adam.lr,
            betas=adam.betas,
            cuda=dist_.device.type == "cuda",
        )
        client = None if cfg.fused_optimizer else adam.optimizer(sae.parameters())
        self.module, self.zero, _, _ = ds.initialize(
            model=sae, optimizer=client, config=self.config
        )
        if self.stage == 3:
            self._share_fp32_master()
        # The torch optimiser that steps the partitions (DeepSpeed wraps it).
        self.optimizer: torch.optim.Optimizer = getattr(self.zero, "optimizer", self.zero)
        for group in self.optimizer.param_groups:
            group["lr"] = adam.lr
        self.scheduler = adam.scheduler(self.optimizer)
        self._safe = ds.utils
        log.info(
            "DeepSpeed ZeRO-%d on %d ranks%s: %s",
            self.stage,
            dist_.world_size,
            " with optimiser offload" if cfg.offload_optimizer else "",
            {k: f"{v / 2**20:.1f} MiB" for k, v in self.memory().items()},
        )

    @property
    def kind(self) -> str:
        return f"zero{self.stage}"

    def _share_fp32_master(self) -> None:
        """Let the optimiser step the parameter partition in place when both are fp32 on the
        same device, instead of a second fp32 copy of it.

        DeepSpeed 0.19 means to do this (stage3.py, "we don't need another copy of the
        weights") but compares a ``torch.device`` with a device-name string, which is never
        equal, so every fp32 ZeRO-3 run holds the partition twice: 4/3 of the state that
        ZeRO-3 should hold. Sharing the storage keeps the tensor objects (the optimiser state is
        keyed by them); DeepSpeed's copy of the master into the partition after each step
        becomes a copy onto itself. The memory and parity tests check both effects.
        """
        z = self.zero
        if getattr(z, "offload_optimizer", False) or getattr(z, "swap_optimizer", False):
            return
        groups = zip(z.fp16_partitioned_groups_flat, z.fp32_partitioned_groups_flat, strict=True)
        for lp, master in groups:
            if (
                lp is not None
                and lp is not master
                and lp.dtype == master.dtype
                and lp.device == master.device
                and lp.numel() == master.numel()
            ):
                master.data = lp.data

    def forward(self, x_ND: Tensor, **kwargs: Any) -> SAEOutput:
        return self.module(x_ND, **kwargs)

    def backward(self, loss: Tensor) -> None:
        self.module.backward(loss)

    def step(self, skip: Tensor) -> Tensor:
        """As ``LocalEngine.step``. DeepSpeed computes the gradient norm on the host and skips
        a step where it is not finite; ``skip`` reaches torch's fused Adam inside it."""
        skip_if(self.optimizer, skip)
        self.module.step()
        norm = self.module.get_global_grad_norm()
        skip = skip | ~torch.isfinite(torch.as_tensor(float("nan") if norm is None else norm))
        skip = skip.to(self.dist.device)
        self.scheduler.step()
        self._normalize_decoder(keep=~skip)
        return skip

    # -- the decoder constraint on partitioned weights --------------------------------------

    @torch.no_grad()
    def _normalize_decoder(self, keep: Tensor) -> None:
        """Rescale every decoder row to unit norm in the fp32 master weights and in the
        parameters the next forward uses (unless ``keep`` is false: a skipped step). Nothing
        for an unconstrained decoder."""
        if not self.sae.unit_norm_decoder:
            return
        # Under stage 3 a DeepSpeed partitioned parameter: its ds_* attributes are not typed.
        W: Any = self.sae.W_dec
        if self.stage < 3:
            # Parameters are whole on every rank (and equal): normalise them, then write this
            # rank's piece of the fp32 master copy that the optimiser steps.
            self.sae.normalize_decoder(keep=keep)
            self._safe.safe_set_full_fp32_param(W, W.detach())
            return
        n_rows, width = W.ds_shape
        local = self._safe.safe_get_local_fp32_param(W)  # flat, padded partition
        piece = W.ds_tensor.ds_numel
        start = piece * dist.get_rank(group=W.ds_process_group)
        index = torch.arange(start, start + piece, device=local.device)
        valid = index < W.ds_numel
        rows = torch.where(valid, index // width, 0)
        sq_F = torch.zeros(n_rows, dtype=torch.float32, device=local.device)
        sq_F.index_add_(0, rows, torch.where(valid, local.float().square(), 0.0))
        if self.dist.active:
            dist.all_reduce(sq_F, group=W.ds_process_group)
        scale = torch.where(keep, sq_F.sqrt().clamp_min(1e-8).reciprocal(), 1.0)[rows]
        normed = torch.where(valid, local * scale.to(local.dtype), local)
        self._safe.safe_set_local_fp32_param(W, normed)
        W.ds_tensor.data.copy_(normed.to(W.ds_tensor.device, W.ds_tensor.dtype))
        if getattr(W, "ds_persist", False):
            # Below ``param_persistence_threshold`` the whole parameter also stays on every rank
            # (refreshed by DeepSpeed after its step, so before this): rescale it too.
            self.sae.normalize_decoder(keep=keep)

    # -- reporting ---------------------------------------------------------------------------

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float:
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def memory(self) -> dict[str, int]:
        """Bytes of SAE training state this rank holds: its parameter partition (whole
        parameters below stage 3, and stage-3 parameters kept whole by the persistence
        threshold), the fp32 master partition where it is a separate copy, the Adam moments."""
        params: list[Any] = list(self.sae.parameters())  # ds_* attributes are not typed
        whole = 0  # persistent stage-3 parameters: whole on every rank once first used
        if self.stage == 3:
            held = [p.ds_tensor for p in params]
            masters = list(self.zero.fp32_partitioned_groups_flat)
            whole = sum(
                p.ds_numel * p.element_size() for p in params if getattr(p, "ds_persist", False)
            )
        else:
            held = params
            masters = list(self.zero.single_partition_of_fp32_groups)
        held_bytes = _tensor_bytes(held)
        return {
            "params": held_bytes + whole,
            # fp32 training at stage 3 steps the parameter partition itself (no copy).
            "master": _tensor_bytes(held + masters) - held_bytes,
            "optimizer": _tensor_bytes(_optimizer_state_tensors(self.optimizer)),
            "grads": _tensor_bytes(m.grad for m in masters),
        }

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """For ``state.pt``; the partitioned state goes through ``save_shards``."""
        return {
            "strategy": self.kind,
            "input_scale": self.sae.input_scale.detach().cpu(),
            # Buffers are whole on every rank: the input scale, batchtopk's threshold.
            "buffers": {k: v.detach().cpu() for k, v in self.sae.named_buffers()},
            "scheduler": self.scheduler.state_dict(),
        }

    def save_shards(self, folder: Path) -> None:
        """Every rank writes its partitions (a collective)."""
        self.module.save_checkpoint(str(folder), tag=self.TAG, save_latest=False)

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore from a checkpoint that passed :func:`checkpoint.check_layout`."""
        path, _ = self.module.load_checkpoint(
            str(folder),
            tag=self.TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ConfigError(f"checkpoint {folder} has no DeepSpeed state in {self.TAG}/")
        self.sae.input_scale.copy_(state["input_scale"])
        buffers = dict(self.sae.named_buffers())
        for name, value in state.get("buffers", {}).items():  # absent before 0.2
            buffers[name].copy_(value)
        self.adam.load_scheduler(self.scheduler, state["scheduler"])

    def full_tensors(self) -> dict[str, Tensor]:
        """The whole SAE, gathered from the partitions (a collective: every rank calls)."""
        if self.stage < 3:
            return self.sae.export_tensors()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.sae.parameters())):
            return {k: v.clone() for k, v in self.sae.export_tensors().items()}
