"""Throughput of the training pipeline's stages, printed as a table.

For each setting it measures, in one process:

- data: images/s of shard reading + decoding + CLIP preprocess (the DataLoader alone);
- data+CLIP: images/s of the full activation stage (loader + frozen ViT forward to the hook);
- SAE step: tokens/s of forward + backward + Adam + decoder renorm on random tokens;
- end to end: tokens/s and data-wait fraction of the real training loop (``Trainer``);
- cache: images/s of reading an activation cache of the same images (``patchsae cache``, fp16),
  and the training loop's tokens/s and data-wait fraction when it trains from that cache.

Settings: the demo (tiny ViT, 64 px, 128 -> 1,024 latents) and ViT-B-16 at 224 px with a
768 -> 8,192 SAE (random weights: same cost as the real ones, nothing to download).

    python benchmarks/throughput.py [--device cpu|cuda] [--only demo|vit-b16]

Numbers vary with machine load; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from patchsae.data.activations import ActivationSource, load_visual  # noqa: E402
from patchsae.data.demo import make_demo_data  # noqa: E402
from patchsae.data.shards import ImageShards, OrderedBatches, expand_urls  # noqa: E402
from patchsae.trainer.config import load_config  # noqa: E402
from patchsae.trainer.loop import Trainer  # noqa: E402
from patchsae.trainer.sae import SparseAutoencoder  # noqa: E402
from patchsae.trainer.tracking import read_metrics  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setting:
    name: str
    model: str
    image_size: int
    n_latents: int
    images: int  # images read for the data stages
    clip_batch: int
    sae_batch: int  # tokens per SAE step
    e2e_steps: int


SETTINGS = {
    "demo": Setting("demo", "patchsae-demo-vit", 64, 1024, 400, 50, 2048, 40),
    "vit-b16": Setting("vit-b16", "ViT-B-16", 224, 8192, 48, 16, 1024, 8),
}


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def data_rate(shards: ImageShards, images: int, workers: int) -> float:
    def run():
        seen = 0
        shards.set_position(0)
        batches = OrderedBatches(DataLoader(shards, batch_size=None, num_workers=workers), workers)
        for batch in batches:
            seen += len(batch["pixels"])
            if seen >= images:
                break
        return seen

    seconds, seen = _timed(run)
    return seen / seconds


def clip_rate(shards: ImageShards, source: ActivationSource, images: int, workers: int) -> float:
    def run():
        seen = 0
        shards.set_position(0)
        batches = OrderedBatches(DataLoader(shards, batch_size=None, num_workers=workers), workers)
        for batch in batches:
            source(batch["pixels"])
            seen += len(batch["pixels"])
            if seen >= images:
                break
        if source.visual.conv1.weight.is_cuda:
            torch.cuda.synchronize()
        return seen

    seconds, seen = _timed(run)
    return seen / seconds


def sae_rate(d: int, f: int, batch: int, device: str, steps: int = 5) -> float:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, f).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d, device=device)

    def step():
        out = sae(x, l1_coeff=8e-5, ghost_mask_F=torch.zeros(f, dtype=torch.bool, device=device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sae.normalize_decoder()

    step()  # warm-up: allocator, Adam state
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def end_to_end(
    s: Setting, shards_dir: Path, out: Path, device: str, workers: int, extra: tuple = ()
) -> dict:
    overrides = [
        *_model_overrides(s, shards_dir, workers),
        *extra,
        # The smallest mixer refills on every step, so each logged step includes its data cost.
        f"data.mix_buffer_tokens={2 * s.sae_batch}",
        f"sae.n_latents={s.n_latents}",
        "sae.expansion=null",
        f"sae.init_sample_tokens={s.sae_batch}",
        f"train.batch_tokens={s.sae_batch}",
        f"train.total_tokens={s.e2e_steps * s.sae_batch}",
        "train.total_images=null",
        "train.log_every=1",
        "train.checkpoint_every=0",
        f"train.device={device}",
        f"train.out_dir={out}",
        "tracking.enabled=false",
        "eval.every=0",  # no zero-shot evaluation: it needs the held-out split `make train` makes
    ]
    Trainer(load_config(ROOT / "configs" / "demo.yaml", overrides)).run()
    metrics = {k: [v for _, v in rows[1:]] for k, rows in read_metrics(out).items()}
    # Skip the first logged step (it fills the mixer from empty), then pool the steps: rates
    # are ratios, so they are summed as seconds, images and wait time, not averaged.
    seconds = [s.sae_batch / rate for rate in metrics["perf/tokens_per_s"]]
    total = sum(seconds)
    return {
        "perf/tokens_per_s": s.sae_batch * len(seconds) / total,
        "perf/images_per_s": sum(
            r * t for r, t in zip(metrics["perf/images_per_s"], seconds, strict=True)
        )
        / total,
        "perf/data_wait_frac": sum(
            w * t for w, t in zip(metrics["perf/data_wait_frac"], seconds, strict=True)
        )
        / total,
    }


def _model_overrides(s: Setting, shards_dir: Path, workers: int) -> list[str]:
    return [
        f"model.name={s.model}",
        "model.pretrained=null",  # throughput does not depend on the weights
        f"data.urls={shards_dir}",
        f"data.num_workers={workers}",
        f"data.images_per_batch={s.clip_batch}",
    ]


def cache_rates(s: Setting, shards_dir: Path, tmp: Path, device: str, workers: int) -> dict:
    """Write the images' activations to a cache, time one read of it, train from it."""
    from patchsae.data.cache import ActivationCache, CachedStream
    from patchsae.data.cache_writer import CacheOptions, build_cache
    from patchsae.data.mixer import TokenMixer

    folder = tmp / f"cache-{s.name}"
    cfg = load_config(ROOT / "configs" / "demo.yaml", _model_overrides(s, shards_dir, workers))
    build_cache(cfg, CacheOptions(out=str(folder), shard_images=64, device=device))
    cache = ActivationCache.open(folder)
    stream = CachedStream(
        cache, TokenMixer(2, 0), units_per_read=s.clip_batch, shuffle_shards=True,
        shuffle_units=True, seed=0, device=device,
    )  # fmt: skip
    shard_ids, unit_ids = stream.epoch_order(0)
    start = time.perf_counter()
    for i in range(0, len(unit_ids), s.clip_batch):
        stream.read_units(shard_ids[i : i + s.clip_batch], unit_ids[i : i + s.clip_batch])
    read = len(unit_ids) / (time.perf_counter() - start)
    extra = ("data.source=cache", f"data.cache={folder}")
    e2e = end_to_end(s, shards_dir, tmp / f"run-cache-{s.name}", device, workers, extra)
    return {
        "cache img/s": read,
        "cache train tok/s": e2e["perf/tokens_per_s"],
        "cache data-wait": e2e["perf/data_wait_frac"],
    }


def bench(s: Setting, device: str, workers: int, tmp: Path) -> dict:
    shards_dir = tmp / f"shards-{s.name}"
    n_images = max(s.images, 200)
    make_demo_data(shards_dir, n_images=n_images, image_size=s.image_size, images_per_shard=50)
    visual, preprocess = load_visual(s.model, None, cache_dir=None, init_seed=0)
    source = ActivationSource(visual.to(device), -2, "all")
    shards = ImageShards(
        expand_urls(str(shards_dir)),
        preprocess,
        batch_size=s.clip_batch,
        shuffle_shards=False,
        shuffle_buffer=0,
        seed=0,
    )
    row = {
        "setting": s.name,
        "model": f"{s.model} {s.image_size}px, {source.tokens_per_image} tok/img",
        "sae": f"{source.width} x {s.n_latents}",
        "data img/s": data_rate(shards, s.images, workers),
        "data+CLIP img/s": clip_rate(shards, source, s.images, workers),
        "SAE step tok/s": sae_rate(source.width, s.n_latents, s.sae_batch, device),
    }
    e2e = end_to_end(s, shards_dir, tmp / f"run-{s.name}", device, workers)
    row.update(
        {
            "train tok/s": e2e["perf/tokens_per_s"],
            "train img/s": e2e["perf/images_per_s"],
            "data-wait": e2e["perf/data_wait_frac"],
        }
    )
    row.update(cache_rates(s, shards_dir, tmp, device, workers))
    return row


def print_table(rows: list[dict], device: str, workers: int) -> None:
    cols = list(rows[0])
    fmt = lambda v: (
        f"{v:,.2f}"
        if isinstance(v, float) and v < 10
        else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    )
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\nthroughput on {name}; DataLoader workers: {workers}; torch {torch.__version__}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(SETTINGS):
            rows.append(bench(SETTINGS[name], args.device, args.workers, Path(tmp)))
    print_table(rows, args.device, args.workers)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
