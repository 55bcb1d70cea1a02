"""The training loop: token stream -> SAE step -> metrics, checkpoints, MLflow.

Shape legend: N tokens, D model width, F latents.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from patchsae import kernels
from patchsae.data.cache import CachedStream
from patchsae.data.stream import TokenStream
from patchsae.trainer import checkpoint, saelens
from patchsae.trainer.config import (
    Config,
    ConfigError,
    SAEConfig,
    check_model,
    config_from_dict,
)
from patchsae.trainer.distributed import AdamSchedule, Distributed, Engine
from patchsae.trainer.inputs import build_stream, init_sample, needs_weights
from patchsae.trainer.metrics import LatentStats, MetricSums
from patchsae.trainer.plots import density_histogram
from patchsae.trainer.sae import SparseAutoencoder
from patchsae.trainer.tracking import NullTracker, Tracker, read_run_info
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Step sizes resolved from the config and the model's token count."""

    tokens_per_image: int
    batch_tokens: int
    """Tokens per optimiser step over all ranks."""
    local_tokens: int
    """Tokens per step on each rank."""
    total_steps: int

    @classmethod
    def make(cls, cfg: Config, tokens_per_image: int, world_size: int) -> Plan:
        t = cfg.train
        batch = t.batch_tokens or (t.batch_images or 0) * tokens_per_image  # one is set
        if batch % world_size:
            raise ConfigError(
                f"train.batch_tokens={batch} does not split over {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        total = t.total_tokens or (t.total_images or 0) * tokens_per_image  # one is set
        local = batch // world_size
        if 2 * local > cfg.data.mix_buffer_tokens:
            raise ConfigError(
                f"data.mix_buffer_tokens={cfg.data.mix_buffer_tokens} must hold at least two "
                f"per-rank batches ({2 * local} tokens); raise it"
            )
        return cls(tokens_per_image, batch, local, max(1, math.ceil(total / batch)))


def lr_factor(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine to ``min_lr_frac``."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(total_steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


class StopRequest:
    """Set by SIGUSR1/SIGTERM (e.g. Slurm's warning before the time limit): the loop writes a
    checkpoint at the next log step and exits cleanly.

    ``restore()`` puts the previous handlers back when training ends. Under torchrun in
    ``slurm/train.sh`` the previous disposition of USR1 is "ignore", so a warning resent while
    the interpreter shuts down (when Python drops its own handlers) cannot kill the process.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): no handler
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: checkpointing at the next log step", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def train_step(
    engine: Engine,
    stats: LatentStats,
    dist: Distributed,
    sae_cfg: SAEConfig,
    batch_tokens: int,
    x_ND: Tensor,
    step: int = 0,
    ghost_index: Tensor | None = None,
) -> tuple[kernels.SAEOutput, Tensor]:
    """One optimiser step (number ``step``, from 0) on this rank's ``x_ND``; ``batch_tokens``
    counts all ranks' tokens. Returns the SAE output and whether the step was skipped (a device
    bool). ``ghost_index``: ``LatentStats.ghost_candidates`` for this step; with none, no ghost
    (or AuxK) term is computed at all.

    A step whose loss (on any rank) or gradient norm is not finite is skipped: weights and
    Adam state stay as they were, decided on the device. Firing counts are summed over ranks
    before they update ``stats``, so the ghost-grad mask and the dead-latent statistics are
    global and equal on every rank; the same all-reduce carries the loss check.
    """
    ghost = stats.ghost_mask(sae_cfg.ghost_window_steps) if sae_cfg.ghost_grads else None
    if ghost_index is not None and len(ghost_index) == 0:
        ghost = None  # no latent can be silent this interval: the term is 0, skip its cost
    # relu's ghost term runs on the candidate columns only (AuxK takes the whole mask).
    relu_ghost = ghost is not None and ghost_index is not None and sae_cfg.architecture == "relu"
    warmup = min(1.0, (step + 1) / sae_cfg.l1_warmup_steps) if sae_cfg.l1_warmup_steps else 1.0
    out = engine.forward(
        x_ND,
        l1_coeff=sae_cfg.l1_coeff * warmup,
        mse_norm=sae_cfg.mse_norm,
        l1_decoder_norm=sae_cfg.l1_decoder_norm,
        ghost_mask_F=ghost,
        aux_k=sae_cfg.aux_k or max(1, x_ND.shape[-1] // 2),
        aux_coeff=sae_cfg.aux_coeff,
        bandwidth=sae_cfg.jumprelu_bandwidth,
        **({"ghost_index_G": ghost_index} if relu_ghost else {}),
    )
    engine.backward(out.loss)
    with torch.no_grad():
        bad = ~torch.isfinite(out.loss.detach())
        # int32 partial sums: several times faster than int64 down the token axis on a CPU
        fired_F = (out.f_NF > 0).sum(dim=0, dtype=torch.int32).long()
        packed = dist.all_reduce_sum(torch.cat([fired_F, bad.reshape(1)]))
        fired_F, skipped = packed[:-1], engine.step(packed[-1] > 0)
        stats.update(fired_F, batch_tokens, keep=~skipped)
        if sae_cfg.architecture == "batchtopk":  # the smallest kept activation over all ranks
            f_NF = out.f_NF.detach()
            smallest = -dist.all_reduce_max(-torch.where(f_NF > 0, f_NF, torch.inf).min())
            engine.sae.update_threshold(smallest.reshape(1, 1), keep=~skipped)
    return out, skipped


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the likely fix."""


def setup_process(cfg: Config, dist: Distributed) -> None:
    """Logging (INFO on rank 0) and the CPU thread count, once per process."""
    logging.basicConfig(
        level=logging.INFO if dist.rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {dist.rank}] %(levelname)s %(name)s: %(message)s",
    )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


@dataclass
class Shared:
    """What the SAEs trained in one pass (``trainer.sweep``) share: the stop request, the
    process group, the token stream, the plan and, on a fresh start, the token sample each SAE
    initialises from."""

    stop: StopRequest
    dist: Distributed
    stream: TokenStream | CachedStream
    plan: Plan
    sample: Tensor | None = None


class Trainer:
    """One training run on this rank, built in order by the named builders below: the process
    group, the resume point, the token stream, the SAE, the engine, the evaluation and the
    tracker."""

    def __init__(
        self, cfg: Config, resume: str | None = None, shared: Shared | None = None
    ) -> None:
        self.cfg = cfg
        # First, so that a stop signal arriving during start-up is not lost.
        self.stop = shared.stop if shared else StopRequest()
        self.dist = (
            shared.dist if shared else Distributed.from_env(cfg.distributed, cfg.train.device)
        )
        if shared is None:
            setup_process(cfg, self.dist)
        self.run_dir = Path(cfg.train.out_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.layer = check_model(cfg.model, weights=needs_weights(cfg))
        self.kernel_path = kernels.kernel_path()
        self.ckpt_path = self._find_resume(resume)
        if self.ckpt_path is not None:
            self._check_resumable(self.ckpt_path)
        self.stream = shared.stream if shared else build_stream(cfg, self.dist, self.layer)
        self.plan = (
            shared.plan
            if shared
            else Plan.make(cfg, self.stream.tokens_per_image, self.dist.world_size)
        )
        self.keep_checkpoints: int | None = cfg.train.keep_checkpoints
        """Checkpoints kept after each save; None: no pruning (a sweep prunes its members)."""
        self._build_sae(shared.sample if shared else None)
        self.engine = self._build_engine()
        if self.ckpt_path is not None:
            self._load(self.ckpt_path)
        self.monitor = self._build_monitor()
        self.tracker = self._build_tracker()

    # -- builders ----------------------------------------------------------------------------

    def _build_sae(self, sample: Tensor | None) -> None:
        """The SAE (seeded; initialised from ``sample``, or from tokens drawn now, on a fresh
        start), its running latent statistics and metric sums, and the step counters."""
        cfg = self.cfg
        d = self.stream.width
        f = cfg.sae.n_latents or (cfg.sae.expansion or 0) * d  # exactly one of them is set
        if cfg.sae.architecture in ("topk", "batchtopk") and cfg.sae.k >= f:
            raise ConfigError(
                f"config error at 'sae.k': {cfg.sae.k} active latents of {f} is no sparsity; "
                "set sae.k well below the width (e.g. 32)"
            )
        torch.manual_seed(cfg.train.seed)
        self.sae = SparseAutoencoder.from_config(d, f, cfg.sae).to(self.dist.device)
        self.stats = LatentStats(f, cfg.train.dead_window_tokens, self.dist.device)
        self.sums = MetricSums(d, self.dist.device)
        # Non-finite steps skipped: [in all, in a row now], on the device (read at log steps).
        self.skips = torch.zeros(2, dtype=torch.int64, device=self.dist.device)
        self.step = 0
        self.ghost_index: Tensor | None = None  # see train_step
        self.run_id: str | None = None
        if self.ckpt_path is None:
            self._init_from_data(sample)

    def _build_engine(self) -> Engine:
        """The SAE's optimiser state laid out for the configured strategy."""
        cfg = self.cfg
        adam = AdamSchedule(
            cfg.train.lr, cfg.train.betas, lambda s: lr_factor(s, cfg, self.plan.total_steps)
        )
        return self.dist.engine(
            self.sae, cfg.distributed, adam, local_tokens=self.plan.local_tokens
        )

    def _build_monitor(self) -> Any:
        """The zero-shot evaluation of an ``eval`` section, on the main rank only."""
        if not (self.cfg.eval.every and self.dist.is_main):
            return None
        from patchsae.analysis.zeroshot import ZeroShotMonitor

        return ZeroShotMonitor(self.cfg, self.run_dir, self.dist.device)

    # -- setup -------------------------------------------------------------------------------

    def _find_resume(self, resume: str | None) -> Path | None:
        """``None``: fresh start (refused where a run already is, so that nothing is
        overwritten); ``if-present``: the newest intact checkpoint of the run directory if
        there is one (what a requeued job wants); ``auto``: that, or an error; anything else
        names a checkpoint or run folder. Checkpoints are verified against their manifest."""
        if resume is None:
            existing = checkpoint.candidates(self.run_dir)
            if existing:
                raise checkpoint.CheckpointError(
                    f"train.out_dir {self.run_dir} already holds a run (newest checkpoint "
                    f"{existing[0].name}); pass --resume to continue it, or set another "
                    "train.out_dir (or delete that folder) to start a new run"
                )
            return None
        if resume == "if-present" and not checkpoint.candidates(self.run_dir):
            log.info("no checkpoint in %s: starting a new run", self.run_dir)
            return None
        folder = self.run_dir if resume in ("auto", "if-present") else Path(resume)
        return checkpoint.pick_verified(resume, folder, self._verify)

    def _verify(self, path: Path) -> list[str]:
        """Every rank checks its share of the checkpoint's files; all get the whole list."""
        mine = checkpoint.verify(path, self.dist.rank, self.dist.world_size)
        return sorted({p for part in self.dist.all_gather_object(mine) for p in part})

    def _check_resumable(self, path: Path) -> None:
        saved = config_from_dict(checkpoint.read_export(path)[1]["config"])
        # a changed threshold rate would rescale the checkpoint's jumprelu thresholds
        sae = ("n_latents", "expansion", "jumprelu_threshold_lr")
        fixed = {"model": None, "sae": sae, "data": ("source",)}
        for section, keys in fixed.items():
            old, new = getattr(saved, section), getattr(self.cfg, section)
            for key in keys or old.__dataclass_fields__:
                if getattr(old, key) != getattr(new, key):
                    raise ConfigError(
                        f"--resume {path}: {section}.{key} was {getattr(old, key)!r} in the "
                        f"checkpoint but is {getattr(new, key)!r} now; resume with the same "
                        "value or start a new run directory"
                    )
        checkpoint.check_layout(path, saved.distributed, self.cfg.distributed, self.dist.world_size)

    def _init_from_data(self, sample: Tensor | None) -> None:
        """``b_dec`` (and the input scale) from a token sample, drawn through the mixer."""
        if sample is None:
            sample = init_sample(self.stream, self.cfg)
        self.sae.init_from_sample(sample, self.cfg.sae.init_b_dec, self.cfg.sae.scale_inputs)
        log.info(
            "initialised b_dec (%s) from %d tokens; input scale %.4g",
            self.cfg.sae.init_b_dec,
            len(sample),
            self.sae.input_scale.item(),
        )

    def _build_tracker(self) -> Tracker | NullTracker:
        t = self.cfg.tracking
        if not self.dist.is_main:
            return NullTracker()
        if self.ckpt_path is not None and self.run_id is None:
            # The checkpoint was written before the server first answered: the tracker may
            # have created the run later and recorded it beside the checkpoints.
            self.run_id = (read_run_info(self.run_dir) or {}).get("run_id")
        tracker = Tracker(
            self.run_dir,
            enabled=t.enabled,
            tracking_uri=t.tracking_uri,
            experiment=t.experiment,
            run_name=t.run_name or self.run_dir.resolve().name,
            run_id=self.run_id,
            flush_timeout_s=t.flush_timeout_s,
            system_metrics_every_s=t.system_metrics_every_s,
        )
        if self.ckpt_path is None:
            params = self.cfg.flat()
            params.update(
                {
                    "kernels/path": self.kernel_path,
                    "plan/batch_tokens": self.plan.batch_tokens,
                    "plan/total_steps": self.plan.total_steps,
                    "plan/tokens_per_image": self.plan.tokens_per_image,
                    "sae/d_in": self.sae.d_in,
                    "sae/n_latents": self.sae.n_latents,
                    "model/layer_index": self.layer,
                    "distributed/world_size": self.dist.world_size,
                    "distributed/engine": self.engine.kind,
                }
            )
            tracker.log_params(params)
            config_yaml = self.run_dir / "config.yaml"
            checkpoint.atomic_write(
                config_yaml, lambda p: p.write_text(yaml.safe_dump(self.cfg.to_dict())), "config"
            )
            tracker.log_artifact(config_yaml)
        return tracker

    # -- state -------------------------------------------------------------------------------

    def cfg_json(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "config": c.to_dict(),
            "d_in": self.sae.d_in,
            "n_latents": self.sae.n_latents,
            "model": c.model.name,
            "pretrained": c.model.pretrained,
            "layer": self.layer,
            "hook": f"visual.transformer.resblocks.{self.layer} (output, residual stream)",
            "tokens": c.model.tokens,
            "mse_norm": c.sae.mse_norm,
            "input_scale": float(self.sae.input_scale),
            "note": "weights act on raw activations; latents equal the trained ones / input_scale",
            "step": self.step,
            "tokens_seen": self.step * self.plan.batch_tokens,
            "mlflow_run_id": self.run_id,
        }

    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            **self.engine.state_dict(),
            "step": self.step,
            "stats": self.stats.state_dict(),
            "rng": rng,
            "run_id": getattr(self.tracker, "run_id", None) or self.run_id,
            "skipped_steps": int(self.skips[0]),
        }

    def _load(self, path: Path) -> None:
        state, stream = checkpoint.load_state(path, self.dist.rank)
        self.engine.load(state, path)
        self.stats.load_state_dict(state["stats"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.stream.load_state_dict(stream)
        self.step, self.run_id = state["step"], state["run_id"]
        self.skips[0] = state.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path | None:
        """Write a checkpoint (a collective): each rank its files into ``step_X.tmp``, every
        rank hashes its share of them for the manifest, rank 0 renames the folder into place.
        A failure on any rank removes the temp folder and raises on every rank; a full disk
        raises ``DiskFullError`` naming what and where. Returns the checkpoint on rank 0."""
        tmp = checkpoint.step_dir(self.run_dir, self.step).with_suffix(".tmp")
        main = self.dist.is_main
        self._collectively(tmp, lambda: checkpoint.begin(self.run_dir, self.step) if main else None)
        self._collectively(tmp, lambda: self._write_files(tmp))
        digests = self._collectively(tmp, lambda: self._digest_share(tmp))
        parts = self.dist.all_gather_object(digests)
        merged = {name: d for part in parts for name, d in part.items()}
        keep = self.keep_checkpoints

        def seal() -> Path | None:
            if not main:
                return None
            checkpoint.write_manifest(tmp, merged)
            return checkpoint.commit(tmp, keep=keep)

        final = self._collectively(tmp, seal)
        self.dist.barrier()
        return final

    def _collectively(self, tmp: Path, work: Callable[[], Any]) -> Any:
        """``work()`` on every rank; where it fails on any rank, remove ``tmp`` and raise on
        all of them (the failing rank's own error, a full disk named as such)."""
        error: BaseException | None = None
        result = None
        try:
            result = work()
        except Exception as err:
            error = err
        failed = torch.tensor([float(error is not None)], device=self.dist.device)
        if not self.dist.all_reduce_max(failed).item():
            return result
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        name = tmp.with_suffix("").name
        if error is None:
            raise RuntimeError(f"checkpoint {name}: another rank failed to write it (see its log)")
        if checkpoint.is_disk_full(error, tmp.parent):
            raise checkpoint.disk_full_error(f"checkpoint {name}", tmp) from error
        raise error

    def _write_files(self, tmp: Path) -> None:
        checkpoint.save_stream(tmp, self.dist.rank, self.stream.state_dict())
        self.engine.save_shards(tmp)
        tensors = self.engine.full_tensors()  # a collective under ZeRO-3
        if self.dist.is_main:
            checkpoint.save_state(
                tmp, tensors=tensors, cfg_json=self.cfg_json(), state=self._state()
            )

    def _digest_share(self, tmp: Path) -> dict[str, dict[str, Any]]:
        missing = [
            r for r in range(self.dist.world_size) if not (tmp / f"stream_rank{r}.pt").exists()
        ]
        if missing:
            raise checkpoint.CheckpointError(
                f"checkpoint {tmp}: rank {self.dist.rank} cannot see the files of ranks "
                f"{missing}; train.out_dir must be on a filesystem that every node sees"
            )
        return checkpoint.digest_files(tmp, self.dist.rank, self.dist.world_size)

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self, x_ND: Tensor) -> None:
        sae, every = self.cfg.sae, self.cfg.train.log_every
        if sae.ghost_grads and (self.ghost_index is None or self.step % every == 0):
            # Refreshed at log steps (a host sync there already): the latents that can fall
            # silent before the next one.
            self.ghost_index = self.stats.ghost_candidates(sae.ghost_window_steps, every)
        out, skipped = train_step(
            self.engine,
            self.stats,
            self.dist,
            self.cfg.sae,
            self.plan.batch_tokens,
            x_ND,
            step=self.step,
            ghost_index=self.ghost_index,
        )
        with torch.no_grad():
            x = x_ND.to(self.sae.W_enc.dtype) * self.sae.input_scale
            self.sums.add(out, x, keep=~skipped)
            self.skips[0] += skipped
            self.skips[1] = (self.skips[1] + 1) * skipped
        self.step += 1

    def log_metrics(self, clock: dict[str, float]) -> dict[str, float]:
        """The loop's one host sync: reduce the interval's sums over ranks and log them."""
        packed = self.dist.all_reduce_sum(self.sums.packed())
        metrics = self.sums.compute(packed)
        steps = packed[MetricSums.FIELDS.index("steps")].item() / self.dist.world_size
        now = time.perf_counter()
        elapsed = max(now - clock["t"], 1e-9)
        wait = self.stream.wait_s - clock["wait"]
        counts = torch.tensor(
            [float(self.stream.images_seen - clock["images"]), float(self.stream.skipped_total)],
            dtype=torch.float64,
        )
        images: list[float] = self.dist.all_reduce_sum(counts.to(self.dist.device)).tolist()
        metrics.update(
            {
                "sparsity/dead_frac": float(self.stats.dead_frac()),
                "sparsity/dense_frac": float(self.stats.dense_frac()),
                "perf/tokens_per_s": steps * self.plan.batch_tokens / elapsed,
                "perf/images_per_s": images[0] / elapsed,
                "perf/data_wait_frac": min(wait / elapsed, 1.0),
                "opt/lr": self.engine.lr(),
                "opt/grad_norm": self.engine.grad_norm(),
                "perf/sparse_step_frac": kernels.stats.sparse_step_frac,
                "data/skipped": images[1],
                "data/epoch": float(self.stream.epoch),
                "train/skipped_steps": float(self.skips[0]),
            }
        )
        self.tracker.log_metrics(metrics, step=self.step)
        self.sums.reset()
        kernels.stats.reset()
        clock.update(t=now, wait=self.stream.wait_s, images=self.stream.images_seen)
        if self.dist.is_main:
            log.info(
                "step %d/%d | %.0f tok/s | loss %.4g | fvu %.4f | l0 %.1f | dead %.3f | "
                "wait %.0f%% | skipped %d",
                self.step,
                self.plan.total_steps,
                metrics["perf/tokens_per_s"],
                metrics["loss/total"],
                metrics["quality/fvu"],
                metrics["sparsity/l0"],
                metrics["sparsity/dead_frac"],
                100 * metrics["perf/data_wait_frac"],
                metrics["train/skipped_steps"],
            )
        return metrics

    def evaluate(self) -> None:
        """Zero-shot accuracy without and with the current SAE spliced in, on the main rank (the
        full weights are gathered on every rank first: a collective under ZeRO-3)."""
        tensors = self.engine.full_tensors()
        if self.monitor is None:
            return
        start = time.perf_counter()
        metrics = self.monitor.evaluate(tensors)
        self.tracker.log_metrics(metrics, step=self.step)
        log.info(
            "step %d: zero-shot accuracy %.2f%%, with the SAE spliced in %.2f%% (%.1f s)",
            self.step,
            100 * metrics["eval/zeroshot_acc"],
            100 * metrics["eval/zeroshot_acc_spliced"],
            time.perf_counter() - start,
        )

    def _check_diverged(self) -> None:
        """Stop after ``train.max_skipped_steps`` non-finite steps in a row (read at log steps,
        so up to ``log_every`` more may pass), with a checkpoint of the current state: skipped
        steps leave it alone, so it is finite. Its own next loss was not, though, so the
        message also names the newest earlier checkpoint whose weights still gave finite
        losses, the one to resume from with a lower learning rate."""
        in_a_row = int(self.skips[1])
        if in_a_row < self.cfg.train.max_skipped_steps:
            return
        first_bad = self.step - in_a_row + 1
        earlier = [
            p
            for p in checkpoint.candidates(self.run_dir)
            if int(p.name.split("_")[-1]) < first_bad - 1
        ]
        final = self.save()
        lr = f"train.lr={self.cfg.train.lr:g}"
        if earlier:
            advice = (
                f"continue from {earlier[0]}, the newest checkpoint before the failure, with "
                f"--resume {earlier[0]} --set train.lr=<lower>"
            )
        else:
            advice = (
                f"no checkpoint precedes step {first_bad}: start a new run with a lower train.lr "
                "(or set train.checkpoint_every to keep earlier states)"
            )
        raise TrainingDiverged(
            f"training stopped at step {self.step}: steps {first_bad}-{self.step} had a "
            "non-finite loss or gradient norm and were skipped, weights and Adam state "
            f"untouched ({int(self.skips[0])} skipped in all; train.max_skipped_steps="
            f"{self.cfg.train.max_skipped_steps}). The learning rate is the likely cause "
            f"({lr}): {advice}. The state at the stop is saved in {final} (finite, but its "
            "loss was not). If the loss was never finite, check the data for non-finite values"
        )

    def _stop_requested(self) -> bool:
        flag = torch.tensor([float(self.stop.requested)], device=self.dist.device)
        return bool(self.dist.all_reduce_max(flag).item())

    def run(self) -> dict[str, Any]:
        """Train to ``plan.total_steps`` (or until a stop signal); returns a summary."""
        return drive([self])[0]

    def _finish(self) -> None:
        tensors = self.engine.full_tensors()
        digests = self.dist.replica_digests(tensors)
        if not self.dist.is_main:
            return
        checkpoint.atomic_write(
            self.run_dir / "replicas.json",
            lambda p: p.write_text(json.dumps(digests, indent=1)),
            "the replica digests",
        )
        if len(set(digests)) != 1:
            log.error("ranks hold different SAE weights at the end: %s", digests)
        self.run_id = self.tracker.run_id or self.run_id
        checkpoint.write_export(self.run_dir, tensors, self.cfg_json())
        plot = density_histogram(self.stats.density().cpu(), self.run_dir / "density_hist.png")
        self.tracker.log_artifact(plot, "plots")
        for name in ("sae.safetensors", saelens.WEIGHTS, "cfg.json"):  # a folder SAELens loads
            self.tracker.log_artifact(self.run_dir / name, "sae")


def drive(
    trainers: list[Trainer], after_save: Callable[[list[Trainer]], None] | None = None
) -> list[dict[str, Any]]:
    """Train every trainer on the same token batches (one run, or the members of a sweep, all
    built on one :class:`Shared`) to the plan's end or a stop signal; returns their summaries.

    They log, evaluate and checkpoint at the same steps (``after_save`` runs once all have
    saved). A run that diverges raises :class:`TrainingDiverged`; in a sweep that member stops
    (its state saved, its MLflow run FAILED), the others go on, and its summary holds the
    error as ``diverged``."""
    lead = trainers[0]
    stream, dist, cfg, total = lead.stream, lead.dist, lead.cfg, lead.plan.total_steps
    active = list(trainers)
    status: dict[int, str] = {}
    diverged: dict[int, str] = {}
    metrics: dict[int, dict[str, float]] = {}
    clocks = {}
    for t in trainers:
        t.run_id = t.tracker.run_id or t.run_id
        clocks[id(t)] = {
            "t": time.perf_counter(),
            "wait": stream.wait_s,
            "images": stream.images_seen,
        }
    interrupted = False

    def save_all() -> None:
        for t in active:
            t.save()
        if after_save is not None:
            after_save(active)

    try:
        while active and active[0].step < total:
            x_ND = stream.next_batch(lead.plan.local_tokens)
            for t in active:
                t.train_step(x_ND)
            step = active[0].step
            if step % cfg.train.log_every == 0 or step == total:
                for t in list(active):
                    metrics[id(t)] = t.log_metrics(clocks[id(t)])
                    try:
                        t._check_diverged()
                    except TrainingDiverged as err:
                        if len(trainers) == 1:
                            raise
                        log.error("%s: %s", t.run_dir.name, err)
                        t.tracker.close(status="FAILED")
                        active.remove(t)
                        diverged[id(t)] = str(err)
                if lead._stop_requested():
                    interrupted = True
                    break
            every = cfg.eval.every
            if every and (step % every == 0 or step == total):
                for t in active:
                    t.evaluate()
            if (
                cfg.train.checkpoint_every
                and step % cfg.train.checkpoint_every == 0
                and step < total
            ):
                save_all()
        save_all()
        if not interrupted:
            for t in active:
                t._finish()
    except BaseException:
        status.update({id(t): "FAILED" for t in active})
        raise
    finally:
        for t in active:
            t.tracker.close(status="RUNNING" if interrupted else status.get(id(t), "FINISHED"))
        stream.close()
        dist.close()
        lead.stop.restore()
    return [
        {
            "step": t.step,
            "interrupted": interrupted,
            "metrics": metrics.get(id(t), {}),
            "diverged": diverged.get(id(t)),
        }
        for t in trainers
    ]


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    if cfg.sweep:
        from patchsae.trainer.sweep import train_sweep

        return train_sweep(cfg, resume)
    return Trainer(cfg, resume).run()
