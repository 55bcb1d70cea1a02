"""Cost of zero-shot evaluation with and without the SAE spliced in, and of one masking sweep.

For each setting, in one process, on random pixels and random weights (the same cost as real
ones, nothing to download), images/s of:

- zero-shot: the ViT forward (to the hook, then the blocks after it and the head) + logits;
- spliced: the same with every token at the hook replaced by the SAE's reconstruction;
- sweep: one class-level masking sweep (`patchsae eval-masking`: 3 selections x on/off x the
  k values, plus the unmasked splice), which runs the ViT to the hook and the SAE encode once per
  batch and, per variant, only the masked decode and the blocks after the hook;
- naive sweep (computed): the spliced rate divided by the number of variants, what rerunning
  the whole forward for every variant would give. ``sweep x naive`` is the saving.

Settings: the demo (tiny ViT, 64 px, 128 -> 2,048, 8 classes) and ViT-B-16 at 224 px with the
paper's 768 -> 49,152 SAE and 1,000 classes.

    python benchmarks/evals.py [--device cpu|cuda] [--only demo|vit-b16] [--ks 1 10 100 all]

Numbers vary with machine load; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from patchsae.analysis.masking import (  # noqa: E402
    DEFAULT_KS,
    MaskingTable,
    class_ranks,
    parse_ks,
    ranked_latents,
    sweep_batch,
)
from patchsae.analysis.model import TrainedSAE  # noqa: E402
from patchsae.analysis.zeroshot import SplicedCLIP  # noqa: E402
from patchsae.data.activations import vision_config  # noqa: E402
from patchsae.trainer.config import ModelConfig  # noqa: E402


@dataclass
class Setting:
    name: str
    model: str
    n_latents: int
    n_classes: int
    batch: int
    batches: int


SETTINGS = {
    "demo": Setting("demo", "patchsae-demo-vit", 2048, 8, 64, 4),
    "vit-b16": Setting("vit-b16", "ViT-B-16", 49152, 1000, 4, 1),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(s: Setting, device: torch.device, ks_arg: list[str]) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    model_cfg = ModelConfig(name=s.model, pretrained=None, layer=-2, tokens="all")
    d = vision_config(s.model)["width"]
    sae = TrainedSAE(Path("."), _random_sae(d, s, g), {}, model_cfg)
    clip = SplicedCLIP.load(sae, device=str(device))
    size = clip.source.image_size
    size = size if isinstance(size, int) else size[0]
    pixels = torch.randn(s.batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, s.n_classes, (s.batch,), generator=g)
    embed = clip.visual.output_dim
    text_CE = torch.nn.functional.normalize(torch.randn(s.n_classes, embed, generator=g), dim=-1)
    text_CE = text_CE.to(device)
    counts = torch.randint(0, 100, (s.n_classes, s.n_latents), generator=g)
    order = ranked_latents(counts, counts.sum(0), seed=0)
    ranks = class_ranks(order, device)
    ks = parse_ks(ks_arg or [k for k in DEFAULT_KS if k == "all" or int(k) < s.n_latents],
                  s.n_latents)  # fmt: skip
    variants = 1 + 6 * len(ks)

    def zero_shot(spliced: bool) -> None:
        x = clip.hooked(pixels)
        if spliced:
            x = clip.splice(x, "all")
        (clip.features(x) @ text_CE.T).argmax(-1)

    def masking() -> None:
        sweep_batch(clip, text_CE, ranks, ks, pixels, labels, MaskingTable(ks, s.n_classes))

    zero_shot(True)  # warm-up
    rates = {}
    for name, work in (("zero_shot", lambda: zero_shot(False)),
                       ("spliced", lambda: zero_shot(True)), ("sweep", masking)):  # fmt: skip
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(s.batches):
            work()
        _sync(device)
        rates[name] = s.batch * s.batches / (time.perf_counter() - t0)
    rates["naive"] = rates["spliced"] / variants
    rates["variants"] = variants
    return rates


def _random_sae(d: int, s: Setting, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "W_enc": torch.randn(d, s.n_latents, generator=g) / d**0.5,
        "b_enc": torch.full((s.n_latents,), -0.5),
        "W_dec": torch.randn(s.n_latents, d, generator=g) / s.n_latents**0.5,
        "b_dec": torch.zeros(d),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(SETTINGS), default=None)
    parser.add_argument("--ks", nargs="+", default=None, help="k values of the sweep")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = [args.only] if args.only else list(SETTINGS)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        "| setting | latents | zero-shot img/s | spliced img/s | sweep variants | sweep img/s | "
        "naive sweep img/s | sweep / naive |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        s = SETTINGS[name]
        r = measure(s, device, args.ks)
        print(
            f"| {name} | {s.n_latents:,} | {r['zero_shot']:.1f} | {r['spliced']:.1f} | "
            f"{r['variants']} | {r['sweep']:.2f} | {r['naive']:.2f} | "
            f"{r['sweep'] / r['naive']:.1f}x |"
        )


if __name__ == "__main__":
    main()
