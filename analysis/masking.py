"""Class-level top-k latent masking: which latents carry each class for zero-shot classification.

Shape legend: B images, T tokens, D width, F latents, C classes, E embedding, S selections.

For each class, its top-k latents by the class x latent counts (tokens above tau) of a
``patchsae analyze`` pass over a *selection split*; the accuracy is measured on an *evaluation
split* that shares no shard with it. With the SAE's reconstruction spliced in at every token
(:mod:`patchsae.analysis.zeroshot`), ``on`` keeps only the chosen latents of each image's class
(the others zeroed before decoding), ``off`` zeroes them. Baselines at the same k: ``random``
(k latents drawn per class, seeded) and ``dataset`` (the top-k of the dataset-level counts, the
same for every class). ``on`` with all latents is the plain spliced model.

Per batch, the ViT runs up to the hook once and the SAE encodes once; each (selection, mode, k)
only masks the codes, decodes and runs the blocks after the hook.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from patchsae.analysis.model import AnalysisError, load_trained, read_class_names
from patchsae.analysis.stats import encode
from patchsae.analysis.zeroshot import (
    SplicedCLIP,
    labelled_batches,
    log_eval_results,
    templates_for,
)
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_KS = ("1", "2", "5", "10", "50", "100", "500", "1000", "2000", "all")
SELECTIONS = ("class", "random", "dataset")
MODES = ("on", "off")


def parse_ks(values: list[str] | tuple[str, ...], n_latents: int) -> list[int]:
    """k values (``all`` = every latent), checked against the SAE's width."""
    out = []
    for value in values:
        if value == "all":
            out.append(n_latents)
            continue
        try:
            k = int(value)
        except ValueError:
            raise AnalysisError(f"--k {value!r}: give whole numbers or 'all'") from None
        if not 1 <= k <= n_latents:
            raise AnalysisError(
                f"--k {k} is out of range: the SAE has {n_latents} latents; use 1..{n_latents} "
                "or 'all'"
            )
        out.append(k)
    return sorted(set(out))


def ranked_latents(counts_CF: Tensor, dataset_F: Tensor, seed: int) -> dict[str, Tensor]:
    """``[C, F]`` latent order per class for each selection; the top-k of a class is the first
    k of its row. Ties go to the smaller latent index."""
    C, F = counts_CF.shape

    def order(values: Tensor) -> Tensor:  # count descending; a stable sort keeps index order
        return torch.sort(-values.double(), dim=-1, stable=True).indices

    gen = torch.Generator().manual_seed(seed)
    return {
        "class": order(counts_CF),
        "random": torch.stack([torch.randperm(F, generator=gen) for _ in range(C)]),
        "dataset": order(dataset_F).expand(C, F).clone(),
    }


@dataclass
class MaskingTable:
    """Correct and total counts per (selection, mode, k) and class, and those of the unmasked
    spliced model and of the CLIP without the SAE."""

    ks: list[int]
    n_classes: int
    selections: tuple[str, ...] = SELECTIONS

    def __post_init__(self) -> None:
        shape = (len(self.selections), len(MODES), len(self.ks), self.n_classes)
        self.correct = torch.zeros(shape, dtype=torch.int64)
        self.total_C = torch.zeros(self.n_classes, dtype=torch.int64)
        self.spliced_correct_C = torch.zeros(self.n_classes, dtype=torch.int64)
        self.clip_correct_C = torch.zeros(self.n_classes, dtype=torch.int64)

    def accuracy(self, correct_C: Tensor) -> float:
        return float(correct_C.sum()) / max(int(self.total_C.sum()), 1)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s, selection in enumerate(self.selections):
            for m, mode in enumerate(MODES):
                for i, k in enumerate(self.ks):
                    correct = self.correct[s, m, i]
                    out.append(
                        {
                            "selection": selection,
                            "mode": mode,
                            "k": k,
                            "accuracy": self.accuracy(correct),
                            "per_class": [
                                float(c) / int(t) if int(t) else None
                                for c, t in zip(correct, self.total_C, strict=True)
                            ],
                        }
                    )
        return out


def check_disjoint(selection_data: str, evaluation_data: str) -> None:
    """The evaluation shards must not be among the selection shards (compared as resolved
    paths or URLs)."""
    from patchsae.data.shards import expand_urls

    def resolved(urls: str) -> set[str]:
        return {u if "://" in u else str(Path(u).resolve()) for u in expand_urls(urls)}

    shared = resolved(selection_data) & resolved(evaluation_data)
    if shared:
        raise AnalysisError(
            f"--data shares {len(shared)} shard(s) with the selection split the analysis read "
            f"({selection_data}), e.g. {sorted(shared)[0]}: latents would be chosen on the images "
            "they are scored on; evaluate on held-out shards, or analyze another split first"
        )


def class_ranks(order: dict[str, Tensor], device: torch.device) -> Tensor:
    """``[S, C, F]``: the position of latent j in class c's order under each selection (in the
    order of ``order``'s keys)."""
    return torch.stack([torch.argsort(ranked, dim=-1) for ranked in order.values()]).to(device)


@torch.no_grad()
def sweep_batch(
    clip: SplicedCLIP,
    text_CE: Tensor,
    rank_SCF: Tensor,
    ks: list[int],
    pixels: Tensor,
    labels: Tensor,
    table: MaskingTable,
) -> None:
    """One batch of every (selection, mode, k), added to ``table``: the ViT to the hook and the
    SAE encode once, then per variant only the masked decode and the blocks after the hook."""
    t = clip.tensors
    x_BTD = clip.hooked(pixels)
    B, T, D = x_BTD.shape
    F = t["W_enc"].shape[1]
    codes_BTF = encode(x_BTD.reshape(-1, D), t).reshape(B, T, F)
    labels_dev = labels.to(clip.device)
    table.total_C += torch.bincount(labels, minlength=table.n_classes)

    def hits(mask_BF: Tensor) -> Tensor:
        recon = (codes_BTF * mask_BF[:, None, :]) @ t["W_dec"] + t["b_dec"]
        logits = clip.features(recon.to(x_BTD.dtype)) @ text_CE.T
        return (logits.argmax(-1) == labels_dev).long().cpu()

    plain = clip.features(x_BTD) @ text_CE.T
    table.clip_correct_C.index_add_(0, labels, (plain.argmax(-1) == labels_dev).long().cpu())
    table.spliced_correct_C.index_add_(0, labels, hits(torch.ones(B, F, device=clip.device)))
    for s in range(len(table.selections)):
        rank_BF = rank_SCF[s][labels_dev]
        for i, k in enumerate(ks):
            chosen = (rank_BF < k).to(codes_BTF.dtype)
            for m, mode in enumerate(MODES):
                got = hits(chosen if mode == "on" else 1 - chosen)
                table.correct[s, m, i].index_add_(0, labels, got)


def sweep(
    clip: SplicedCLIP,
    text_CE: Tensor,
    order: dict[str, Tensor],
    ks: list[int],
    data: str,
    batch_images: int,
    selection: Path | None = None,
) -> MaskingTable:
    """Every (selection, mode, k) over the labelled images of ``data``; ``order`` maps each
    selection's name to its ``[C, F]`` latent order (:func:`ranked_latents`). ``selection``:
    the analysis folder the latents were chosen from; an image of ``data`` that it read (by
    content, in any shard) stops the sweep."""
    from patchsae.analysis.outputs import read_digests

    C = next(iter(order.values())).shape[0]
    table = MaskingTable(ks, C, tuple(order))
    rank_SCF = class_ranks(order, clip.device)
    refuse = read_digests(selection) if selection is not None else None
    classes = "classes in the analysis; evaluate on a split labelled like the selection split"
    batches = labelled_batches(
        data,
        clip.preprocess,
        batch_images,
        classes=(C, classes),
        refuse=refuse,
        refused=f"the analysis {selection}",
    )
    for pixels, labels, _ in batches:
        sweep_batch(clip, text_CE, rank_SCF, ks, pixels, labels, table)
    if int(table.total_C.sum()) == 0:
        raise AnalysisError(f"no labelled images in {data}; check the URLs")
    return table


def plot_png(rows: list[dict[str, Any]], spliced: float, title: str | None = None) -> bytes:
    """Accuracy against k (log scale), one line per selection and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    styles = {"on": "-", "off": "--"}
    known = {"class": "tab:red", "random": "tab:grey", "dataset": "tab:blue"}
    selections = list(dict.fromkeys(r["selection"] for r in rows))
    others = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive"])
    colours = {s: known.get(s) or next(others, "black") for s in selections}
    for selection in selections:
        for mode in MODES:
            points = [(r["k"], r["accuracy"]) for r in rows
                      if r["selection"] == selection and r["mode"] == mode]  # fmt: skip
            ax.plot(*zip(*points, strict=True), styles[mode], marker="o", markersize=3,
                    color=colours[selection], label=f"{selection} top-k, {mode}")  # fmt: skip
    ax.axhline(spliced, color="black", linewidth=0.8, linestyle=":", label="spliced, no mask")
    ax.set_xscale("log")
    ax.set_xlabel("k (latents per class)")
    ax.set_ylabel("zero-shot accuracy")
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def eval_masking(
    run_dir: str | Path,
    data: str,
    *,
    analysis: str | Path | None = None,
    ks: list[str] | tuple[str, ...] | None = None,
    templates: str = "auto",
    classnames: str | None = None,
    seed: int = 0,
    batch_images: int = 64,
    pretrained: str | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """``patchsae eval-masking``: the sweep, written to ``OUT/masking.csv``, ``masking.json`` and
    ``masking.png`` (default ``RUN_DIR/eval``) and logged to the SAE's MLflow run (metrics
    ``masking/<selection>_<mode>_acc`` at step k, the files under ``eval/``)."""
    from patchsae.analysis.outputs import read_statistics

    if batch_images < 1:
        raise AnalysisError(f"--batch-images {batch_images}: must be >= 1")
    sae = load_trained(run_dir)
    if ks is None:  # the default list, up to the SAE's width
        ks = [k for k in DEFAULT_KS if k == "all" or int(k) < sae.n_latents]
    k_values = parse_ks(ks, sae.n_latents)
    analysis = Path(analysis) if analysis else Path(run_dir) / "analysis"
    summary, stats = read_statistics(
        analysis, sae, label=str(analysis),
        fix=f"run `patchsae analyze {run_dir} --data SELECTION_SHARDS` first, on another split "
        "than --data",
    )  # fmt: skip
    counts_CF = stats["class_counts_CF"]
    check_disjoint(summary["data"], data)
    from patchsae.data.shards import expand_urls

    names = read_class_names(classnames, expand_urls(data)) or summary.get("classes")
    if not names:
        raise AnalysisError(
            f"no class names for {data}: pass --classnames FILE or put a classes.json beside it"
        )
    if len(names) != counts_CF.shape[0]:
        raise AnalysisError(
            f"{len(names)} class names but the analysis counted {counts_CF.shape[0]} classes; "
            "pass the class names of the selection split's labels"
        )
    clip = SplicedCLIP.load(sae, pretrained=pretrained, device=device)
    text_CE = clip.classifier(names, templates_for(templates, sae.model.name))
    order = ranked_latents(counts_CF, stats["dataset_counts_F"], seed)
    table = sweep(clip, text_CE, order, k_values, data, batch_images, selection=analysis)
    rows = table.rows()
    spliced = table.accuracy(table.spliced_correct_C)
    result = {
        "run_dir": str(run_dir),
        "data": data,
        "selection_data": summary["data"],
        "images": int(table.total_C.sum()),
        "classes": names,
        "seed": seed,
        "clip_accuracy": table.accuracy(table.clip_correct_C),
        "spliced_accuracy": spliced,
        "rows": rows,
    }
    out_dir = Path(out) if out else Path(run_dir) / "eval"
    _write(out_dir, result, plot_png(rows, spliced))
    if mlflow:
        _log(sae, out_dir, rows)
    return result


def _write(out_dir: Path, result: dict[str, Any], png: bytes) -> None:
    from patchsae.trainer.checkpoint import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    names = result["classes"]
    writer = csv.writer(buf)
    writer.writerow(["selection", "mode", "k", "accuracy", *[f"acc[{n}]" for n in names]])
    for r in result["rows"]:
        per = ["" if a is None else f"{a:.6f}" for a in r["per_class"]]
        writer.writerow([r["selection"], r["mode"], r["k"], f"{r['accuracy']:.6f}", *per])
    text = json.dumps(result, indent=1)
    atomic_write(out_dir / "masking.csv", lambda p: p.write_text(buf.getvalue()), "masking.csv")
    atomic_write(out_dir / "masking.json", lambda p: p.write_text(text), "masking.json")
    atomic_write(out_dir / "masking.png", lambda p: p.write_bytes(png), "masking.png")


def _log(sae: Any, out_dir: Path, rows: list[dict[str, Any]]) -> None:
    metrics = [(f"masking/{r['selection']}_{r['mode']}_acc", r["accuracy"], r["k"]) for r in rows]
    files = [out_dir / name for name in ("masking.csv", "masking.json", "masking.png")]
    log_eval_results(sae, metrics, files, "the masking sweep")
