"""Memory, communication and step time of DDP and DeepSpeed ZeRO 1, 2, 3 for wide SAEs.

    python benchmarks/scaling.py                      # d=768, n=49,152 and 2^17, 2 CPU ranks
    python benchmarks/scaling.py --widths 49152 1048576 --device cuda   # on a GPU node

For each strategy and width it launches ``torchrun --nproc_per_node 2`` (gloo on CPU) running
this file with ``--worker``, which trains a d x n SAE through ``trainer.distributed`` on a small
token batch and reports, per rank:

- the SAE training state it holds (parameters, fp32 master copy, Adam moments), read from the
  partitioned tensors (``engine.memory()``);
- the bytes it hands to collectives in one training step (each ``torch.distributed`` collective
  is wrapped; DDP's gradient buckets are counted with a communication hook);
- the median time per step.

It then prints the measured table, with each strategy's time as a ratio to DDP's in the same
run, and a table computed for N ranks from the same accounting: the state per element measured
here, and ring-collective traffic (an all-reduce of M bytes moves 2(N-1)/N M per rank, a
reduce-scatter or all-gather (N-1)/N M).

Widths above what fits this machine (two ranks of DDP at n = 2^20 hold about 52 GB) are computed
only; ``--widths`` measures them where memory allows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
# Collectives, with the argument holding the whole collective's data (M bytes) and the ring
# traffic each rank sends for it on N ranks, as a multiple of M.
COLLECTIVES = {
    "all_reduce": (0, lambda n: 2 * (n - 1) / n),
    "all_gather_into_tensor": (0, lambda n: (n - 1) / n),  # (output, input): output is whole
    "reduce_scatter_tensor": (1, lambda n: (n - 1) / n),  # (output, input): input is whole
    "broadcast": (0, lambda n: (n - 1) / n),
}


MAX_LIVE_PARAMETERS = 1e9
"""DeepSpeed's default ``stage3_max_live_parameters``: below it, ZeRO-3 keeps what the forward
gathered until the backward has used it."""


def traffic(sizes: dict[str, float], world: int) -> float:
    """Bytes each rank sends per step on ``world`` ranks for collectives of ``sizes`` bytes."""
    return sum(COLLECTIVES[op][1](world) * m for op, m in sizes.items())


# -- worker (one torchrun rank) -----------------------------------------------------------------


class CommCounter:
    """Wraps ``torch.distributed``'s collectives and adds up the size of each (M bytes).

    DeepSpeed calls these through ``torch.distributed``; DDP's gradient buckets reach them
    through the ``allreduce_hook`` communication hook, which calls ``dist.all_reduce``.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes: dict[str, int] = {}
        self.enabled = False
        for name, (index, _) in COLLECTIVES.items():
            setattr(dist, name, self._wrap(name, index, getattr(dist, name)))

    def _wrap(self, name, index, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.enabled:
                tensor = args[index] if len(args) > index else list(kwargs.values())[index]
                size = tensor.numel() * tensor.element_size()
                self.bytes[name] = self.bytes.get(name, 0) + size
            return original(*args, **kwargs)

        return counted


def worker(args: argparse.Namespace) -> None:
    import torch
    from patchsae.trainer.config import DistributedConfig, SAEConfig
    from patchsae.trainer.distributed import AdamSchedule, Distributed
    from patchsae.trainer.loop import train_step
    from patchsae.trainer.metrics import LatentStats
    from patchsae.trainer.sae import SparseAutoencoder

    counter = CommCounter()
    strategy = "ddp" if args.strategy == "ddp" else "deepspeed"
    stage = int(args.strategy[-1]) if strategy == "deepspeed" else 2
    cfg = DistributedConfig(strategy=strategy, zero_stage=stage)
    env = Distributed.from_env(cfg, args.device)
    torch.manual_seed(0)
    sae = SparseAutoencoder(args.dim, args.latents).to(env.device)
    engine = env.engine(
        sae, cfg, AdamSchedule(1e-4, (0.9, 0.999), lambda s: 1.0), local_tokens=args.tokens
    )
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        engine.module.register_comm_hook(None, allreduce_hook)
    stats = LatentStats(args.latents, window_tokens=10**9, device=env.device)
    sae_cfg = SAEConfig(l1_coeff=8e-5, ghost_grads=True)
    gen = torch.Generator().manual_seed(env.rank)
    batch = args.tokens * env.world_size

    def step() -> float:
        x = torch.randn(args.tokens, args.dim, generator=gen).to(env.device)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(engine, stats, env, sae_cfg, batch, x)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: Adam state, DeepSpeed buffers
    counter.enabled = True
    step()
    counter.enabled = False
    times = [step() for _ in range(args.steps)]
    memory = engine.memory()
    results = env.all_gather_object(
        {"memory": memory, "comm": counter.bytes, "step_s": statistics.median(times)}
    )
    if env.is_main:
        Path(args.out).write_text(
            json.dumps(
                {
                    "strategy": args.strategy,
                    "n": args.latents,
                    "d": args.dim,
                    "world_size": env.world_size,
                    "params": sum(p.numel() for p in sae.parameters())
                    if strategy == "ddp"
                    else sum(getattr(p, "ds_numel", p.numel()) for p in sae.parameters()),
                    "ranks": results,
                }
            )
        )
    env.barrier()
    env.close()


# -- launcher -------------------------------------------------------------------------------------


def run_one(strategy: str, n: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(args.nproc), str(Path(__file__).resolve()), "--worker",
        "--strategy", strategy, "--latents", str(n), "--dim", str(args.dim),
        "--tokens", str(args.tokens),
        "--steps", str(args.steps), "--device", args.device, "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{strategy} n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def state_bytes(memory: dict) -> int:
    return memory["params"] + memory["master"] + memory["optimizer"]


def computed_state(strategy: str, params: int, world: int) -> float:
    """SAE state bytes per rank for fp32 training on ``world`` ranks: parameters 4 B and Adam
    8 B per element, plus a 4 B fp32 master partition at stages 1-2 (stage 3 steps its
    parameter partition in place). Checked against the measurement at the measured size."""
    p = float(params)
    if strategy == "ddp":
        return 12 * p
    if strategy in ("zero1", "zero2"):
        return 4 * p + 12 * p / world
    return 12 * p / world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--latents", type=int, default=49_152, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=768, help="model width d")
    parser.add_argument("--widths", type=int, nargs="+", default=[49_152, 131_072])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--computed-widths", type=int, nargs="+", default=[49_152, 2**20])
    parser.add_argument("--computed-ranks", type=int, nargs="+", default=[2, 8, 64])
    parser.add_argument(
        "--computed-tokens",
        type=int,
        default=25_216,
        help="global tokens per step for the latent-parallel estimate (the paper: 128 images)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--load", type=Path, help="print the tables of a --json file again")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows = json.loads(args.load.read_text()) if args.load else []
    if args.load:
        args.widths = sorted({r["n"] for r in rows})
        args.nproc, args.dim = rows[0]["world_size"], rows[0]["d"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in [] if args.load else args.widths:
            for strategy in args.strategies:
                print(f"measuring {strategy} at n={n} ...", file=sys.stderr, flush=True)
                rows.append(run_one(strategy, n, args, Path(tmp) / f"{strategy}-{n}.json"))
    if args.json and not args.load:
        args.json.write_text(json.dumps(rows, indent=1))

    print(
        f"\nMeasured: d={args.dim}, {args.nproc} ranks ({args.device}), {args.tokens} tokens per "
        "rank per step, fp32; per rank, GB = 1e9 bytes; traffic = bytes sent per step by ring "
        "collectives\n"
    )
    print(
        "| n | strategy | params | fp32 master | Adam | state | state / 1 process | "
        "traffic / step | time / step | time vs DDP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.widths:
        group = [r for r in rows if r["n"] == n]
        step_s = {r["strategy"]: max(x["step_s"] for x in r["ranks"]) for r in group}
        for r in group:
            m = max((x["memory"] for x in r["ranks"]), key=state_bytes)
            sent = max(traffic(x["comm"], r["world_size"]) for x in r["ranks"])
            want = computed_state(r["strategy"], r["params"], r["world_size"])
            if abs(state_bytes(m) - want) > 0.02 * want:
                print(f"warning: {r['strategy']} n={n}: measured state differs from the model")
            ratio = f"{step_s[r['strategy']] / step_s['ddp']:.2f}" if "ddp" in step_s else "-"
            print(
                f"| {n:,} | {r['strategy']} | {gb(m['params'])} | {gb(m['master'])} | "
                f"{gb(m['optimizer'])} | {gb(state_bytes(m))} | "
                f"{state_bytes(m) / (12 * r['params']):.3f} | {gb(sent)} | "
                f"{step_s[r['strategy']]:.2f} s | {ratio} |"
            )
    print("\nCollective sizes per step (rank 0, GB):")
    for r in rows:
        parts = ", ".join(f"{k} {gb(v)}" for k, v in sorted(r["ranks"][0]["comm"].items()))
        print(f"- n={r['n']:,} {r['strategy']}: {parts}")

    # Per-element collective sizes from the widest measurement of each strategy.
    per_param = {}
    for r in sorted(rows, key=lambda r: r["n"]):
        per_param[r["strategy"]] = {k: v / r["params"] for k, v in r["ranks"][0]["comm"].items()}
    print(
        f"\nComputed for N ranks: d={args.dim}, fp32; per rank, GB; state as measured above per "
        "element, traffic from the measured collective sizes per element\n"
    )
    header = " | ".join(f"N={w} state | N={w} traffic" for w in args.computed_ranks)
    print(f"| n | strategy | 1 process state | {header} |")
    print("|---|---|---|" + "---|---|" * len(args.computed_ranks))
    for n in args.computed_widths:
        params = 2 * n * args.dim + n + args.dim
        for strategy in (s for s in STRATEGIES if s in per_param):
            cells = []
            for world in args.computed_ranks:
                sizes = {k: v * params for k, v in per_param[strategy].items()}
                state = computed_state(strategy, params, world)
                cells.append(f"{gb(state)} | {gb(traffic(sizes, world))}")
            print(f"| {n:,} | {strategy} | {gb(12 * params)} | {' | '.join(cells)} |")
    for n in args.computed_widths:
        params = 2 * n * args.dim + n + args.dim
        if "zero3" in per_param and params > MAX_LIVE_PARAMETERS:
            # The measured runs kept the gathered SAE alive from the forward to the backward.
            sizes = {k: v * params for k, v in per_param["zero3"].items()}
            sizes["all_gather_into_tensor"] *= 2
            again = ", ".join(f"{gb(traffic(sizes, w))} at N={w}" for w in args.computed_ranks)
            print(
                f"\nZeRO-3 at n={n:,}: {params / 1e9:.2f}e9 elements exceed DeepSpeed's "
                f"stage3_max_live_parameters ({MAX_LIVE_PARAMETERS:.0e}), so the backward pass "
                f"gathers the parameters again: traffic up to {again}."
            )
    latent_parallel_table(args)


def latent_parallel_table(args: argparse.Namespace) -> None:
    """The latent-parallel layout is not built; its cost follows from its design: each rank
    owns n/N latents (state 12P/N), the ranks all-gather their tokens so that each sees the
    whole batch, and one all-reduce sums the partial reconstructions (a second one with ghost
    grads). Its traffic grows with the batch, not with n."""
    t, d = args.computed_tokens, args.dim
    print(
        f"\nFor comparison, computed only (not built): latent parallelism at {t:,} tokens per "
        "step with ghost grads on (two all-reduces); state / traffic per rank, GB\n"
    )
    print("| n | " + " | ".join(f"N={w}" for w in args.computed_ranks) + " |")
    print("|---|" + "---|" * len(args.computed_ranks))
    for n in args.computed_widths:
        params = 2 * n * d + n + d
        cells = []
        for world in args.computed_ranks:
            sizes = {"all_gather_into_tensor": 4 * t * d, "all_reduce": 2 * 4 * t * d}
            cells.append(f"{gb(12 * params / world)} / {gb(traffic(sizes, world))}")
        print(f"| {n:,} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
