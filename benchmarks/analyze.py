"""Cost of the analysis pass (`patchsae analyze`) against the CLIP forward alone, as a table.

For each setting, in one process, on random pixels (no shard reading: that cost is the
training pipeline's, see throughput.py):

- forward: images/s of the frozen ViT forward to the hooked block (what any pass must pay);
- analysis: images/s of forward + SAE encode of every token + the streaming statistics
  (``LatentStatistics.update``: sums, counts, class counts, top-k merge);
- state: bytes of statistics held per latent (k = 10 references, ``--classes`` classes).

Settings: the demo (tiny ViT, 64 px, 128 -> 2,048) and ViT-B-16 at 224 px with the paper's
768 -> 49,152 SAE (random weights: same cost as real ones, nothing to download).

    python benchmarks/analyze.py [--device cpu|cuda] [--only demo|vit-b16] [--classes 1000]

Numbers vary with machine load; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from patchsae.analysis.stats import LatentStatistics, encode  # noqa: E402
from patchsae.data.activations import ActivationSource, load_visual  # noqa: E402


@dataclass
class Setting:
    name: str
    model: str
    layer: int
    n_latents: int
    batch: int
    batches: int


SETTINGS = {
    "demo": Setting("demo", "patchsae-demo-vit", -2, 2048, 64, 8),
    "vit-b16": Setting("vit-b16", "ViT-B-16", -2, 49152, 32, 3),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(s: Setting, device: torch.device, n_classes: int) -> dict[str, float]:
    visual, _ = load_visual(s.model, None, cache_dir=None, init_seed=0)
    source = ActivationSource(visual.to(device), s.layer, tokens="all")
    size = source.image_size
    size = size if isinstance(size, int) else size[0]
    d = source.width
    g = torch.Generator(device="cpu").manual_seed(0)
    tensors = {
        "W_enc": (torch.randn(d, s.n_latents, generator=g) / d**0.5).to(device),
        "b_enc": torch.full((s.n_latents,), -0.5).to(device),
        "W_dec": torch.randn(s.n_latents, d, generator=g).to(device),
        "b_dec": torch.zeros(d).to(device),
    }
    pixels = torch.randn(s.batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, n_classes, (s.batch,), generator=g)
    stats = LatentStatistics(s.n_latents, n_classes=n_classes, device=device)
    T = source.n_patches + 1
    chunk = max(1, (256 << 20) // (T * s.n_latents * 4))

    def forward() -> None:
        source.all_tokens(pixels)

    def analysis(step: int) -> None:
        acts = source.all_tokens(pixels)
        ids = torch.arange(s.batch) + step * s.batch
        for start in range(0, s.batch, chunk):
            part = slice(start, start + chunk)
            x = acts[part].reshape(-1, d)
            codes = encode(x, tensors).reshape(-1, T, s.n_latents)
            stats.update(codes, labels[part], ids[part])

    forward()
    analysis(0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(s.batches):
        forward()
    _sync(device)
    t1 = time.perf_counter()
    for step in range(s.batches):
        analysis(step + 1)
    _sync(device)
    t2 = time.perf_counter()
    state = stats.state_dict()
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    images = s.batch * s.batches
    return {
        "forward": images / (t1 - t0),
        "analysis": images / (t2 - t1),
        "bytes_per_latent": state_bytes / s.n_latents,
        "state_mib": state_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(SETTINGS), default=None)
    parser.add_argument("--classes", type=int, default=1000, help="classes of the count matrix")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = [args.only] if args.only else list(SETTINGS)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"| setting | latents | forward img/s | analysis img/s | analysis / forward | "
        f"state bytes per latent ({args.classes} classes) | state MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        s = SETTINGS[name]
        r = measure(s, device, args.classes)
        print(
            f"| {name} | {s.n_latents:,} | {r['forward']:.1f} | {r['analysis']:.1f} | "
            f"{r['analysis'] / r['forward']:.2f} | {r['bytes_per_latent']:,.0f} | "
            f"{r['state_mib']:,.0f} |"
        )


if __name__ == "__main__":
    main()
