"""What ``patchsae analyze`` writes, and where other commands read it back.

Written into the results folder through a temp folder renamed at the end (a folder is either
complete or absent):

* ``latent_stats.safetensors``: every tensor of ``LatentStatistics.results``;
* ``latents.parquet``: one row per latent (frequency, mean activation, entropy, top classes...);
* ``reference_images.parquet``: one row per (latent, rank) reference image: shard, key,
  image id, value, label, class name;
* ``summary.json``: the dataset, the settings, image and token counts;
* ``image_digests.safetensors``: a 64-bit digest of every analysed image's bytes.

The folder is then logged as artifacts of the SAE's own MLflow run (:func:`log_to_mlflow`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from patchsae.analysis.model import TrainedSAE
from patchsae.analysis.stats import LatentStatistics
from torch import Tensor

if TYPE_CHECKING:
    from patchsae.analysis.analyze import AnalyzeOptions

log = logging.getLogger(__name__)

DIGESTS = "image_digests.safetensors"
"""The image_digest of every analysed image (sorted, unique): evaluations refuse splits that
share an image with the analysis, whatever shard or key it has there."""


def read_statistics(
    folder: Path, sae: TrainedSAE, *, label: str, fix: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An analysis's ``summary.json`` and ``latent_stats.safetensors`` tensors, checked to be
    of ``sae``; ``label`` names the folder in messages, ``fix`` says how to make one."""
    from patchsae.analysis.model import AnalysisError
    from safetensors.torch import load_file

    stats_path, summary_path = folder / "latent_stats.safetensors", folder / "summary.json"
    if not stats_path.is_file() or not summary_path.is_file():
        raise AnalysisError(
            f"{label} holds no analysis (latent_stats.safetensors + summary.json); {fix}"
        )
    stats = load_file(str(stats_path))
    width = stats["class_counts_CF"].shape[1]
    if width != sae.n_latents:
        raise AnalysisError(
            f"{label} is the analysis of an SAE with {width} latents, not of {sae.run_dir} "
            f"({sae.n_latents}); analyze this SAE first"
        )
    return json.loads(summary_path.read_text()), stats


def read_tables(folder: Path, sae: TrainedSAE, *, fix: str = "") -> tuple[Any, Any, dict]:
    """An analysis's latent table, reference table and summary, checked to be of ``sae``;
    ``fix`` is added to the command the message names."""
    import pandas as pd
    from patchsae.analysis.model import AnalysisError

    needed = ("latents.parquet", "reference_images.parquet", "summary.json")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise AnalysisError(
            f"{folder} has no complete analysis (missing {missing}); run `patchsae analyze "
            f"{sae.run_dir} --data URLS` first{fix}"
        )
    table = pd.read_parquet(folder / "latents.parquet")
    if len(table) != sae.n_latents:
        raise AnalysisError(
            f"{folder} describes {len(table)} latents but the SAE in {sae.run_dir} has "
            f"{sae.n_latents}; analyze this SAE again"
        )
    refs = pd.read_parquet(folder / "reference_images.parquet")
    return table, refs, json.loads((folder / "summary.json").read_text())


def read_digests(folder: Path) -> Tensor | None:
    """The analysed images' digests of an analysis folder; None for an analysis written before
    they were recorded."""
    from safetensors.torch import load_file

    path = Path(folder) / DIGESTS
    return load_file(str(path))["digests"] if path.is_file() else None


def write_results(
    out: Path,
    sae: TrainedSAE,
    stats: LatentStatistics,
    refs: dict[int, tuple[str, int, int]],
    urls: list[str],
    names: list[str] | None,
    options: AnalyzeOptions,
    skipped: int,
    tokens: str,
    digests: Tensor | None = None,
) -> Path:
    """Write every output into ``out`` through a temp folder and one rename."""
    from safetensors.torch import save_file

    labels_of = {i: label for i, (_, _, label) in refs.items()}
    res = stats.results(labels_of)
    n_classes = res["class_counts_CF"].shape[0]
    names = list(names or [])
    names += [str(c) for c in range(len(names), n_classes)]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(
            {k: v.contiguous() for k, v in res.items()}, str(tmp / "latent_stats.safetensors")
        )
        if digests is not None:
            save_file({"digests": digests.contiguous()}, str(tmp / DIGESTS))
        _latent_table(res, names).to_parquet(tmp / "latents.parquet", index=False)
        _reference_table(res, refs, urls, names).to_parquet(
            tmp / "reference_images.parquet", index=False
        )
        summary = {
            "run_dir": str(sae.run_dir),
            "mlflow_run_id": sae.mlflow_run_id,
            "model": sae.model.name,
            "pretrained": options.pretrained or sae.model.pretrained,
            "layer": sae.model.layer,
            "n_latents": sae.n_latents,
            "data": options.data,
            "shards": len(urls),
            "images": stats.images,
            "tokens": stats.tokens,
            "skipped_samples": skipped,
            "image_tokens": tokens,
            "aggregate": options.aggregate,
            "k": options.k,
            "tau": options.tau,
            "dead_latents": int(res["dead_F"].sum()),
            "classes": names,
            "options": asdict(options),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reference_table(
    res: dict[str, torch.Tensor],
    refs: dict[int, tuple[str, int, int]],
    urls: list[str],
    names: list[str],
):
    """One row per (latent, rank) reference image: shard, key, value, label, class."""
    import pandas as pd

    ids_KF = res["top_ids_KF"]
    rank_K, latent_K = (ids_KF >= 0).nonzero(as_tuple=True)
    rows = []
    for r, j, i, v in zip(
        rank_K.tolist(),
        latent_K.tolist(),
        ids_KF[rank_K, latent_K].tolist(),
        res["top_values_KF"][rank_K, latent_K].tolist(),
        strict=True,
    ):
        key, shard, label = refs[i]
        rows.append((j, r, urls[shard], key, i, v, label, names[label]))
    columns = ["latent", "rank", "shard", "key", "image_id", "value", "label", "class"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["latent", "rank"], ignore_index=True)


def _latent_table(res: dict[str, torch.Tensor], names: list[str]):
    import pandas as pd

    counts_CF = res["class_counts_CF"]
    total_F = counts_CF.sum(dim=0)
    top = counts_CF.topk(min(3, counts_CF.shape[0]), dim=0) if counts_CF.shape[0] else None
    rows: dict[str, Any] = {
        "latent": range(counts_CF.shape[1]),
        "frequency": res["frequency_F"].numpy(),
        "token_frequency": res["token_frequency_F"].numpy(),
        "mean_activation": res["mean_activation_F"].numpy(),
        "dead": res["dead_F"].numpy(),
        "entropy": res["entropy_F"].numpy(),
        "n_references": res["n_references_F"].numpy(),
        "dataset_count": total_F.numpy(),
    }
    if top is not None:
        share = top.values.double() / total_F.clamp_min(1)
        rows["top_class"] = [
            names[c] if n else None
            for c, n in zip(top.indices[0].tolist(), total_F.tolist(), strict=True)
        ]
        rows["top_class_share"] = share[0].numpy()
        rows["top_classes"] = [
            ", ".join(
                f"{names[c]} ({s:.0%})"
                for c, s, v in zip(
                    top.indices[:, j].tolist(),
                    share[:, j].tolist(),
                    top.values[:, j].tolist(),
                    strict=True,
                )
                if v > 0
            )
            for j in range(counts_CF.shape[1])
        ]
    return pd.DataFrame(rows)


def mlflow_target(sae: TrainedSAE) -> tuple[str | None, str]:
    """The SAE's MLflow run id and tracking URI. The run folder's ``mlflow_run.json`` (written
    by the tracker once the run exists) wins over ``cfg.json``, whose id is missing when the
    export was written before the run reached the server; a checkpoint folder looks in its run
    folder."""
    from patchsae.trainer.tracking import read_run_info, resolve_tracking_uri

    configured = sae.cfg_json.get("config", {}).get("tracking", {}).get("tracking_uri")
    for folder in (sae.run_dir, *sae.run_dir.resolve().parents[:2]):
        info = read_run_info(folder)
        if info and info.get("run_id"):
            return info["run_id"], info.get("tracking_uri") or resolve_tracking_uri(
                configured, folder
            )
    return sae.mlflow_run_id, resolve_tracking_uri(configured, sae.run_dir)


def log_to_mlflow(sae: TrainedSAE, out: Path, only: list[str] | None = None) -> None:
    """Log ``out`` as artifacts (``analysis/``, or ``analysis/<folder name>`` for another folder
    than the default) of the SAE's own MLflow run, so the results open from its run page;
    ``only``: just these entries of ``out`` (files or subfolders), not the whole folder again.
    A tracking failure is a warning: the files stay in ``out``."""
    run_id, uri = mlflow_target(sae)
    artifact_path = "analysis" if out.name == "analysis" else f"analysis/{out.name}"
    if not run_id:
        log.warning("the SAE's run has no MLflow run on record; results stay in %s", out)
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if only is None:
            client.log_artifacts(run_id, str(out), artifact_path=artifact_path)
        for name in only or ():
            path = out / name
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=f"{artifact_path}/{name}")
            else:
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    except Exception as err:  # noqa: BLE001 - tracking never loses the results
        log.warning(
            "could not log the analysis to MLflow run %s at %s (%s: %s); the results are in %s",
            run_id,
            uri,
            type(err).__name__,
            err,
            out,
        )
    else:
        print(f"logged {out} to MLflow run {run_id} (artifacts {artifact_path}/)")
