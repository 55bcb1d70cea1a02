"""Trains a small SAE on a synthetic token stream with one distributed strategy.

Run alone (``single``) or under ``torchrun --nproc_per_node N``. Every strategy sees the same
global batches: step ``t``'s batch comes from a generator seeded with ``t``, and rank ``r``
trains on its ``r``-th slice. The per-step global losses, the global firing statistics, each
rank's memory and the final full weights go to ``--out`` (a folder), so that tests can compare
strategies.

Tokens are sparse combinations of a random dictionary plus noise. A quarter of the latents
start with a very negative bias, so they are silent and ghost grads act on them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from patchsae.trainer.config import DistributedConfig, SAEConfig
from patchsae.trainer.distributed import (
    AdamSchedule,
    Distributed,
    exit_process,
    used_process_group,
)
from patchsae.trainer.loop import train_step
from patchsae.trainer.metrics import LatentStats
from patchsae.trainer.sae import SparseAutoencoder
from safetensors.torch import save_file


def global_batch(step: int, tokens: int, width: int, atoms: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000)
    dictionary = torch.randn(atoms, width, generator=gen)
    gen.manual_seed(step)
    codes = torch.rand(tokens, atoms, generator=gen) * (
        torch.rand(tokens, atoms, generator=gen) < 0.08
    )
    return 3.0 * codes @ dictionary + 0.1 * torch.randn(tokens, width, generator=gen) + 1.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--persist", type=int, default=0, help="param_persistence_threshold")
    parser.add_argument("--fused", action="store_true", help="DeepSpeed's own Adam")
    parser.add_argument(
        "--paper", action="store_true", help="MSE / token norm and L1 weighted by decoder norm"
    )
    parser.add_argument("--architecture", default="relu")
    parser.add_argument(
        "--free-decoder", action="store_true", help="no unit-norm constraint, tied init"
    )
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--latents", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global tokens per step")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--l1", type=float, default=0.02)
    parser.add_argument(
        "--nan-step", type=int, default=-1, help="put a NaN into this step's last token"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = DistributedConfig(
        strategy=args.strategy,
        zero_stage=args.stage,
        offload_optimizer=args.offload,
        param_persistence_threshold=args.persist,
        fused_optimizer=args.fused,
    )
    env = Distributed.from_env(cfg, "cpu")
    sae_cfg = SAEConfig(
        n_latents=args.latents,
        expansion=None,
        architecture=args.architecture,
        k=8,
        aux_k=12,
        jumprelu_threshold=0.05,
        jumprelu_bandwidth=0.05,
        l1_coeff=args.l1,
        ghost_grads=True,
        ghost_window_steps=2,
        mse_norm="token_norm" if args.paper else "none",
        l1_decoder_norm=args.paper or args.free_decoder,
        unit_norm_decoder=not args.free_decoder,
        tied_init=args.free_decoder,
        decoder_init_norm=0.1 if args.free_decoder else None,
    )
    local = args.batch // env.world_size
    torch.manual_seed(0)
    sae = SparseAutoencoder.from_config(args.width, args.latents, sae_cfg)
    sae.init_from_sample(global_batch(-1, 256, args.width), "geometric_median", True)
    with torch.no_grad():  # a quarter of the latents start silent: ghost grads revive them
        sae.b_enc[: args.latents // 4] = -4.0
    engine = env.engine(
        sae, cfg, AdamSchedule(3e-3, (0.9, 0.999), lambda s: min(1.0, (s + 1) / 5)),
        local_tokens=local,
    )  # fmt: skip
    stats = LatentStats(args.latents, window_tokens=4 * args.batch, device="cpu")
    record: dict[str, list] = {
        "loss": [], "mse": [], "aux": [], "ghost": [], "dead": [], "skipped": []
    }  # fmt: skip
    for step in range(args.steps):
        x = global_batch(step, args.batch, args.width)
        if step == args.nan_step:  # the last token: on the last rank only
            x[-1, 0] = float("nan")
        x = x[env.rank * local : (env.rank + 1) * local]
        record["ghost"].append(int(stats.ghost_mask(sae_cfg.ghost_window_steps).sum()))
        out, skipped = train_step(engine, stats, env, sae_cfg, args.batch, x)
        record["skipped"].append(bool(skipped))
        terms = torch.stack([out.loss, out.mse, out.aux]).detach()
        env.all_reduce_sum(terms)
        terms /= env.world_size
        for key, value in zip(("loss", "mse", "aux"), terms.tolist(), strict=True):
            record[key].append(value)
        record["dead"].append(int((stats.steps_since_fired_F > 0).sum()))
    tensors = engine.full_tensors()
    memory = env.all_gather_object(engine.memory())
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(args.out / "sae.safetensors"))
        record["memory"] = memory
        record["world_size"] = env.world_size
        record["engine"] = engine.kind
        (args.out / "record.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.barrier()
    env.close()
    if used_process_group():
        exit_process(0)  # as the trainer's entry point does: no finalisation after gloo


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
