"""Recipes against a known ground truth: our architectures and SAELens's on the same tokens.

The tokens come from ``benchmarks/synthetic.py`` (a true dictionary of unit atoms with
power-law firing, a large common offset, noise). Each of our recipes trains through the
project's own step (``trainer.loop.train_step``: the engine, the silent-latent statistics, the
ghost-term candidates refreshed every 10 steps as the trainer does); SAELens's ``standard`` and
``topk`` train in its own venv with its ``SAETrainer`` on the same batches (their digests are
compared). ``plain-pytorch`` is the speed yardstick: the ``paper`` recipe as a bare autograd
loop with ``torch.optim.Adam``. Then every SAE is scored on held-out tokens:

- tok/s: training tokens per second, data generation excluded;
- FVU: unexplained variance (centred); L0: active latents per token; dead: latents that never
  fire on the held-out tokens;
- cos: mean over true atoms of the best cosine with a decoder row; rec: fraction of true atoms
  with a decoder row at cosine > 0.9.

    python benchmarks/recipes.py [--steps 256] [--batch 4096] [--latents 4096] [--no-saelens]
                                 [--no-plain] [--only paper,topk,...]

The sparsity weights were tuned on the default settings (256 steps of 4,096 tokens) to land near
the true L0 (12): the L1 recipes fall from L0 in the hundreds to a collapsed code within a
factor of 1.5 of their weight there, so other run lengths need them tuned again. ``jumprelu``
starts at the true L0 (``jumprelu_init_l0``) with its thresholds learning at 10x the rate
(``jumprelu_threshold_lr``): at 1x, Adam caps how far a threshold moves in 256 steps below how
far the encoder bias moves, the code runs dense (L0 ~115) whatever the L0 weight, and the
weight only matters once the thresholds can keep up. Numbers vary with machine load; compare
ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from patchsae.analysis.stats import encode  # noqa: E402
from patchsae.trainer.config import DistributedConfig, SAEConfig  # noqa: E402
from patchsae.trainer.distributed import AdamSchedule, Distributed  # noqa: E402
from patchsae.trainer.loop import train_step  # noqa: E402
from patchsae.trainer.metrics import LatentStats  # noqa: E402
from patchsae.trainer.sae import SparseAutoencoder  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import Synthetic, batch_digest, recovery  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STANDARD = {
    "unit_norm_decoder": False,
    "l1_decoder_norm": True,
    "tied_init": True,
    "decoder_init_norm": 0.1,
}
RECIPES: dict[str, dict] = {
    "paper": {"architecture": "relu", "l1_coeff": 0.0055, "scale_inputs": True},
    "standard": {"architecture": "relu", "l1_coeff": 0.012, "scale_inputs": True, **STANDARD},
    "topk": {"architecture": "topk", "k": 12, "scale_inputs": True, **STANDARD},
    "batchtopk": {"architecture": "batchtopk", "k": 12, "scale_inputs": True, **STANDARD},
    "jumprelu": {
        "architecture": "jumprelu",
        "l1_coeff": 0.001,
        "scale_inputs": True,
        "jumprelu_init_l0": 12,
        "jumprelu_threshold_lr": 10.0,
        "jumprelu_bandwidth": 0.05,
        **STANDARD,
    },
}
SAELENS = [
    {"name": "saelens-standard", "architecture": "standard", "l1": 2.0},
    {"name": "saelens-standard-l1x2", "architecture": "standard", "l1": 4.0},
    {"name": "saelens-topk", "architecture": "topk", "k": 12},
]
EVAL_INDEX = 10**6  # held-out batches start here


def train_ours(name: str, recipe: dict, synthetic: Synthetic, args: argparse.Namespace) -> dict:
    options = dict(recipe)
    scale = options.pop("scale_inputs")
    sae_cfg = SAEConfig(
        n_latents=args.latents,
        expansion=None,
        ghost_window_steps=64,
        l1_warmup_steps=args.steps // 20,
        **options,
    )
    env = Distributed()
    torch.manual_seed(0)
    sae = SparseAutoencoder.from_config(synthetic.d, args.latents, sae_cfg)
    sae.init_from_sample(synthetic.batch(EVAL_INDEX - 1, args.batch), "geometric_median", scale)
    engine = env.engine(
        sae,
        DistributedConfig(),
        AdamSchedule(args.lr, (0.9, 0.999), lambda s: 1.0),
        local_tokens=args.batch,
    )
    stats = LatentStats(args.latents, window_tokens=10**9, device="cpu")
    seconds, candidates = 0.0, None
    for step in range(args.steps):
        x = synthetic.batch(step, args.batch)
        start = time.perf_counter()
        if step % 10 == 0:
            candidates = stats.ghost_candidates(sae_cfg.ghost_window_steps, 10)
        train_step(engine, stats, env, sae_cfg, args.batch, x, step=step, ghost_index=candidates)
        seconds += time.perf_counter() - start
    return {
        "tensors": sae.export_tensors()
        | ({"k": torch.tensor(sae.k)} if sae.k and recipe["architecture"] == "topk" else {}),
        "seconds": seconds,
    }


def train_plain(synthetic: Synthetic, args: argparse.Namespace) -> dict:
    """The speed yardstick: ReLU + L1 (the ``paper`` recipe's weight) with unit decoder rows as
    a bare PyTorch loop (autograd, ``torch.optim.Adam``), nothing else: no ghost grads, no
    statistics, no checks."""
    d, n = synthetic.d, args.latents
    l1_coeff = RECIPES["paper"]["l1_coeff"]
    torch.manual_seed(0)
    W_enc = torch.nn.Parameter(torch.empty(d, n))
    W_dec = torch.nn.Parameter(torch.empty(n, d))
    torch.nn.init.kaiming_uniform_(W_enc.T, a=5**0.5)
    torch.nn.init.kaiming_uniform_(W_dec.T, a=5**0.5)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(d))
    sample = synthetic.batch(EVAL_INDEX - 1, args.batch)
    scale = d**0.5 / float(sample.norm(dim=-1).mean())
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        b_dec.copy_(sample.mean(dim=0) * scale)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=args.lr)
    seconds = 0.0
    for step in range(args.steps):
        x = synthetic.batch(step, args.batch) * scale
        start = time.perf_counter()
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        loss = (x_hat - x).pow(2).mean() + l1_coeff * f.sum(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
        seconds += time.perf_counter() - start
    tensors = {
        "W_enc": W_enc * scale,
        "b_enc": b_enc,
        "W_dec": W_dec / scale,
        "b_dec": b_dec / scale,
    }
    return {"tensors": {k: v.detach() for k, v in tensors.items()}, "seconds": seconds}


def train_saelens(synthetic: Synthetic, args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    sys.path.insert(0, str(ROOT))
    from tests import saelens_venv

    venv = saelens_venv.venv_dir()
    saelens_venv.build(venv)
    job = {
        "synthetic": {k: getattr(synthetic, k) for k in synthetic.__dataclass_fields__},
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "n_latents": args.latents,
        "out": str(tmp),
        "recipes": SAELENS,
    }
    (tmp / "job.json").write_text(json.dumps(job))
    subprocess.run(
        [
            str(saelens_venv.python_of(venv)),
            "-I",
            str(ROOT / "benchmarks" / "saelens_recipes.py"),
            str(tmp / "job.json"),
        ],
        cwd=tmp,
        check=True,
    )
    report = json.loads((tmp / "saelens.json").read_text())
    ours = batch_digest(synthetic.batch(0, args.batch))
    if abs(report["digest"] - ours) > 1e-6 * abs(ours):
        raise SystemExit(f"SAELens saw other tokens (digest {report['digest']} vs {ours})")
    out = {}
    for recipe in SAELENS:
        tensors = load_file(tmp / f"{recipe['name']}.safetensors")
        if recipe["architecture"] == "topk":
            tensors["k"] = torch.tensor(recipe["k"])
        out[recipe["name"]] = {"tensors": tensors, "seconds": report["seconds"][recipe["name"]]}
    return out


def score(tensors: dict, synthetic: Synthetic, args: argparse.Namespace) -> dict:
    x = torch.cat([synthetic.batch(EVAL_INDEX + i, args.batch) for i in range(4)])
    f = encode(x, tensors)
    x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    cos, rec = recovery(tensors["W_dec"], synthetic.dictionary())
    return {
        "fvu": float(fvu),
        "l0": float((f > 0).sum(dim=-1).float().mean()),
        "dead": float(((f > 0).sum(dim=0) == 0).float().mean()),
        "cos": cos,
        "rec": rec,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated recipe names")
    p.add_argument("--no-saelens", action="store_true", help="skip SAELens's trainers")
    p.add_argument("--no-plain", action="store_true", help="skip the bare PyTorch loop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    synthetic = Synthetic()
    names = args.only.split(",") if args.only else list(RECIPES)
    results = {}
    for name in (n for n in names if n in RECIPES):
        results[name] = train_ours(name, RECIPES[name], synthetic, args)
        rate = args.steps * args.batch / results[name]["seconds"]
        print(f"trained {name}: {rate:,.0f} tok/s", file=sys.stderr, flush=True)
    if not args.no_plain:
        results["plain-pytorch"] = train_plain(synthetic, args)
    if not args.no_saelens:
        with tempfile.TemporaryDirectory() as tmp:
            results |= train_saelens(synthetic, args, Path(tmp))
    tokens = args.steps * args.batch
    print(
        f"\nrecipes on {args.steps} steps of {args.batch} tokens, d {synthetic.d}, "
        f"{synthetic.atoms} true atoms (true L0 {synthetic.true_l0}), {args.latents} latents, "
        f"{args.threads} threads"
    )
    print("| recipe | tok/s | FVU | L0 | dead | cos | rec (cos > 0.9) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = score(r["tensors"], synthetic, args)
        print(
            f"| {name} | {tokens / r['seconds']:,.0f} | {s['fvu']:.3f} | {s['l0']:.1f} | "
            f"{s['dead']:.3f} | {s['cos']:.3f} | {s['rec']:.3f} |"
        )
    rate = {name: tokens / r["seconds"] for name, r in results.items()}
    for other in ("saelens-standard", "plain-pytorch"):
        if "paper" in rate and other in rate:
            print(
                f"\nReLU step (paper, ghost grads on) / {other}: {rate['paper'] / rate[other]:.2f}x"
            )


if __name__ == "__main__":
    main()
