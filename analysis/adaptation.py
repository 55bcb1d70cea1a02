"""Base vs adapted: one SAE on two CLIPs of the same architecture, compared class by class.

Shape legend: C classes, F latents.

Inputs are two ``patchsae analyze`` folders of the same SAE over the same images, one with the
SAE's own CLIP (the *base*) and one with other weights (``analyze --pretrained ADAPTED``, the
*adapted* model: fine-tuned, prompt-tuned...). For each class, the latents highly active under
each model are its top ``top`` latents by the class x latent counts (tokens of the class's images
above tau), among those with a count above zero. A class's latent is

* ``shared`` when it is among the top under both models,
* ``gained`` when only under the adapted model,
* ``lost`` when only under the base model.

With an evaluation split (``--data``, sharing no shard with the analysed images), both models
are also scored zero-shot (without and with the SAE spliced in) and the classes' latents chosen
under one model are kept or zeroed in the other (cross-model top-k masking): when adaptation
remaps existing concepts rather than creating new ones, the base model's class latents still
carry the adapted model's classes.

Outputs (``out``, default ``RUN_DIR/compare``): ``classes.csv`` (one row per class and latent of
either top set), ``compare.json`` (per-class sets, overlap, accuracies), and with ``--data``
``masking.csv`` and ``masking.png`` (accuracy against k per evaluated model and selection).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from patchsae.analysis.masking import (
    DEFAULT_KS,
    check_disjoint,
    parse_ks,
    plot_png,
    ranked_latents,
    sweep,
)
from patchsae.analysis.model import AnalysisError, TrainedSAE, load_trained
from patchsae.analysis.zeroshot import SplicedCLIP, log_eval_results, templates_for
from torch import Tensor

log = logging.getLogger(__name__)

MODELS = ("base", "adapted")
STATUSES = ("shared", "gained", "lost")


def _read_analysis(folder: Path, sae: TrainedSAE, role: str) -> tuple[dict[str, Any], Tensor]:
    """An analysis's summary and its ``[C, F]`` class counts, checked against the SAE."""
    from patchsae.analysis.outputs import read_statistics

    extra = " --pretrained ADAPTED_WEIGHTS" if role == "adapted" else ""
    summary, stats = read_statistics(
        folder, sae, label=f"--{role} {folder}",
        fix=f"run `patchsae analyze {sae.run_dir} --data SHARDS{extra} --out {folder}` first",
    )  # fmt: skip
    return summary, stats["class_counts_CF"]


def _same_images(base: dict[str, Any], adapted: dict[str, Any]) -> None:
    from patchsae.data.shards import expand_urls

    def resolved(urls: str) -> list[str]:
        return sorted(u if "://" in u else str(Path(u).resolve()) for u in expand_urls(urls))

    if resolved(base["data"]) != resolved(adapted["data"]) or base["images"] != adapted["images"]:
        raise AnalysisError(
            f"the two analyses read different images ({base['data']}, {base['images']} images "
            f"vs {adapted['data']}, {adapted['images']}); analyze both models on the same shards"
        )
    for key in ("tau", "image_tokens", "aggregate"):
        if base.get(key) != adapted.get(key):
            raise AnalysisError(
                f"the two analyses differ in {key} ({base.get(key)} vs {adapted.get(key)}); "
                "analyze both models with the same options"
            )
    if base.get("classes") != adapted.get("classes"):
        raise AnalysisError("the two analyses name their classes differently; use one classes.json")


def top_latents(counts_CF: Tensor, top: int) -> list[list[int]]:
    """Per class, its ``top`` latents by count (ties to the smaller index), counts above 0."""
    order_CF = torch.sort(-counts_CF.double(), dim=-1, stable=True).indices[:, :top]
    return [[int(j) for j in row if counts_CF[c, j] > 0] for c, row in enumerate(order_CF)]


def class_sets(base_CF: Tensor, adapted_CF: Tensor, top: int) -> list[dict[str, list[int]]]:
    """Per class: the ``shared``, ``gained`` and ``lost`` latents (each sorted by index)."""
    out = []
    for base, adapted in zip(top_latents(base_CF, top), top_latents(adapted_CF, top), strict=True):
        b, a = set(base), set(adapted)
        out.append({"shared": sorted(b & a), "gained": sorted(a - b), "lost": sorted(b - a)})
    return out


def _rank_of(counts_CF: Tensor) -> Tensor:
    """``[C, F]`` 1-based rank of each latent in its class's count order."""
    order = torch.sort(-counts_CF.double(), dim=-1, stable=True).indices
    return torch.argsort(order, dim=-1) + 1


def _classes_csv(
    names: list[str], sets: list[dict[str, list[int]]], base_CF: Tensor, adapted_CF: Tensor
) -> str:
    base_rank, adapted_rank = _rank_of(base_CF), _rank_of(adapted_CF)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["class", "label", "latent", "status", "base_count", "adapted_count", "base_rank",
         "adapted_rank"]
    )  # fmt: skip
    for c, (name, group) in enumerate(zip(names, sets, strict=True)):
        for status in STATUSES:
            for j in group[status]:
                writer.writerow(
                    [name, c, j, status, int(base_CF[c, j]), int(adapted_CF[c, j]),
                     int(base_rank[c, j]), int(adapted_rank[c, j])]
                )  # fmt: skip
    return buf.getvalue()


def _cross_masking(
    sae: TrainedSAE,
    weights: dict[str, str | None],
    counts: dict[str, Tensor],
    names: list[str],
    data: str,
    ks: list[int],
    *,
    templates: str,
    seed: int,
    batch_images: int,
    device: str,
    selection: Path,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Each model evaluated with each model's class latents (and a random baseline) kept or
    zeroed; returns the rows (with ``model``) and each model's plain and spliced accuracy."""
    rows: list[dict[str, Any]] = []
    accuracy: dict[str, dict[str, Any]] = {}
    prompts = templates_for(templates, sae.model.name)
    for model in MODELS:
        clip = SplicedCLIP.load(sae, pretrained=weights[model], device=device)
        text_CE = clip.classifier(names, prompts)
        order = {f"{m}-class": ranked_latents(counts[m], counts[m].sum(0), seed)["class"]
                 for m in MODELS}  # fmt: skip
        order["random"] = ranked_latents(counts["base"], counts["base"].sum(0), seed)["random"]
        table = sweep(clip, text_CE, order, ks, data, batch_images, selection=selection)
        accuracy[model] = {
            "clip": table.accuracy(table.clip_correct_C),
            "spliced": table.accuracy(table.spliced_correct_C),
            "clip_per_class": [
                float(c) / int(t) if int(t) else None
                for c, t in zip(table.clip_correct_C, table.total_C, strict=True)
            ],
        }
        rows += [{"model": model, **row} for row in table.rows()]
        log.info(
            "%s model on %s: zero-shot %.1f%%, spliced %.1f%%",
            model, data, 100 * accuracy[model]["clip"], 100 * accuracy[model]["spliced"],
        )  # fmt: skip
    return rows, accuracy


def _masking_png(rows: list[dict[str, Any]], accuracy: dict[str, dict[str, Any]]) -> bytes:
    """The two models' accuracy-vs-k plots, side by side."""
    from PIL import Image

    panels = [
        Image.open(
            io.BytesIO(
                plot_png(
                    [r for r in rows if r["model"] == model],
                    accuracy[model]["spliced"],
                    f"evaluated on the {model} model",
                )
            )
        )  # fmt: skip
        for model in MODELS
    ]
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel.convert("RGB"), (x, 0))
        x += panel.width
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def compare_models(
    run_dir: str | Path,
    base: str | Path,
    adapted: str | Path,
    *,
    top: int = 10,
    data: str | None = None,
    ks: list[str] | tuple[str, ...] | None = None,
    templates: str = "auto",
    seed: int = 0,
    batch_images: int = 64,
    device: str = "cpu",
    out: str | Path | None = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """``patchsae compare``: the per-class shared / gained / lost latents of the two analyses,
    and with ``data`` both models' zero-shot accuracy and the cross-model masking sweep."""
    if top < 1:
        raise AnalysisError(f"--top {top}: must be >= 1")
    if batch_images < 1:
        raise AnalysisError(f"--batch-images {batch_images}: must be >= 1")
    sae = load_trained(run_dir)
    if top > sae.n_latents:
        raise AnalysisError(
            f"--top {top} is larger than the SAE's {sae.n_latents} latents; use 1..{sae.n_latents}"
        )
    summaries, counts = {}, {}
    for role, folder in (("base", base), ("adapted", adapted)):
        summaries[role], counts[role] = _read_analysis(Path(folder), sae, role)
    _same_images(summaries["base"], summaries["adapted"])
    weights = {m: summaries[m]["pretrained"] for m in MODELS}
    if weights["base"] == weights["adapted"]:
        raise AnalysisError(
            f"both analyses used the same CLIP weights ({weights['base']}); analyze the adapted "
            "model with `patchsae analyze RUN_DIR --pretrained ADAPTED_WEIGHTS --out ...`"
        )
    names = summaries["base"].get("classes") or [str(c) for c in range(counts["base"].shape[0])]
    sets = class_sets(counts["base"], counts["adapted"], top)
    per_class = [
        {"class": name, "label": c, **group,
         "overlap": len(group["shared"]) / max(len(group["shared"]) + len(group["gained"])
                                               + len(group["lost"]), 1)}
        for c, (name, group) in enumerate(zip(names, sets, strict=True))
    ]  # fmt: skip
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "base": {"analysis": str(base), "weights": weights["base"]},
        "adapted": {"analysis": str(adapted), "weights": weights["adapted"]},
        "selection_data": summaries["base"]["data"],
        "top": top,
        "classes": names,
        "per_class": per_class,
        "totals": {s: sum(len(g[s]) for g in sets) for s in STATUSES},
        "mean_overlap": sum(p["overlap"] for p in per_class) / max(len(per_class), 1),
    }
    out_dir = Path(out) if out else Path(run_dir) / "compare"
    files = {"classes.csv": _classes_csv(names, sets, counts["base"], counts["adapted"]).encode()}
    if data is not None:
        check_disjoint(summaries["base"]["data"], data)
        if ks is None:
            ks = [k for k in DEFAULT_KS if k == "all" or int(k) < sae.n_latents]
        k_values = parse_ks(ks, sae.n_latents)
        rows, accuracy = _cross_masking(
            sae, weights, counts, names, data, k_values, templates=templates, seed=seed,
            batch_images=batch_images, device=device, selection=Path(base),
        )  # fmt: skip
        result |= {"data": data, "accuracy": accuracy, "masking": rows}
        files["masking.csv"] = _masking_csv(rows, names).encode()
        files["masking.png"] = _masking_png(rows, accuracy)
    files["compare.json"] = json.dumps(result, indent=1).encode()
    _write(out_dir, files)
    if mlflow:
        _log(sae, out_dir, result, sorted(files))
    return result


def _masking_csv(rows: list[dict[str, Any]], names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "selection", "mode", "k", "accuracy", *[f"acc[{n}]" for n in names]])
    for r in rows:
        per = ["" if a is None else f"{a:.6f}" for a in r["per_class"]]
        writer.writerow([r["model"], r["selection"], r["mode"], r["k"], f"{r['accuracy']:.6f}",
                         *per])  # fmt: skip
    return buf.getvalue()


def _write(out_dir: Path, files: dict[str, bytes]) -> None:
    from patchsae.trainer.checkpoint import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        atomic_write(out_dir / name, partial(Path.write_bytes, data=content), name)


def _log(sae: TrainedSAE, out_dir: Path, result: dict[str, Any], names: list[str]) -> None:
    metrics = [("compare/mean_overlap", result["mean_overlap"], 0)]
    metrics += [(f"compare/{s}_latents", float(n), 0) for s, n in result["totals"].items()]
    for model, acc in result.get("accuracy", {}).items():
        metrics += [(f"compare/{model}_zeroshot_acc", acc["clip"], 0),
                    (f"compare/{model}_zeroshot_acc_spliced", acc["spliced"], 0)]  # fmt: skip
    metrics += [(f"compare/{r['model']}_{r['selection']}_{r['mode']}_acc", r["accuracy"], r["k"])
                for r in result.get("masking", [])]  # fmt: skip
    files = [out_dir / n for n in names]
    log_eval_results(sae, metrics, files, "the base-vs-adapted comparison", "compare")
