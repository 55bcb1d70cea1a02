"""The latent report: the paper's scatter plot, reference images with masks, one HTML file.

``report.html`` is self-contained (images inlined as data URIs, no external script or style), so
it opens from disk and from the MLflow UI's artifact view alike, where relative links to other
files would not resolve. It holds an index (summary, the scatter of log10 frequency against
log10 mean activation coloured by label entropy, a table of every latent that sorts by a click
on a column header) and a section per selected latent: its statistics and a grid of its
reference images with the latent's mask overlaid, with their classes.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from patchsae.analysis.masks import MaskMaker, overlay
from patchsae.analysis.model import TrainedSAE, load_trained
from patchsae.analysis.outputs import log_to_mlflow, read_tables
from patchsae.data.shards import decode_image, fetch_samples
from patchsae.trainer.checkpoint import atomic_write

log = logging.getLogger(__name__)

REPORT = "report.html"


def select_latents(
    table: pd.DataFrame,
    *,
    frequent: int = 12,
    bands: int = 4,
    per_band: int = 3,
    named: list[int] | None = None,
    seed: int = 0,
) -> list[int]:
    """The latents that get a section: the ``frequent`` most frequent, ``per_band`` drawn (seeded)
    from each of ``bands`` equal bands of log10 frequency, and every ``named`` one; in that
    order, without repeats. Dead latents are only shown when named."""
    alive = table[~table.dead]
    chosen = list(alive.sort_values("frequency", ascending=False).latent[:frequent])
    if len(alive) and bands > 0 and per_band > 0:
        logf = np.log10(alive.frequency.to_numpy())
        edges = np.linspace(logf.min(), logf.max() + 1e-12, bands + 1)
        rng = np.random.default_rng(seed)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            members = alive.latent.to_numpy()[(logf >= lo) & (logf < hi)]
            take = min(per_band, len(members))
            chosen += sorted(rng.choice(members, size=take, replace=False).tolist())
    chosen += list(named or [])
    return list(dict.fromkeys(int(j) for j in chosen))


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    return buffer.getvalue()


def scatter_png(table: pd.DataFrame) -> bytes:
    """log10 frequency vs log10 mean activation of the live latents, coloured by label entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = table[~table.dead]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    points = ax.scatter(
        np.log10(alive.frequency),
        np.log10(alive.mean_activation.clip(lower=1e-12)),
        c=alive.entropy,
        cmap="viridis",
        s=6,
        alpha=0.8,
    )
    fig.colorbar(points, ax=ax, label="label entropy of the reference images (nats)")
    ax.set_xlabel("log10 frequency (fraction of images where the latent is active)")
    ax.set_ylabel("log10 mean activation (over active images)")
    ax.set_title(f"{len(alive):,} live latents of {len(table):,}")
    data = _png(fig)
    plt.close(fig)
    return data


def reference_grid_png(
    maker: MaskMaker, latent: int, refs: pd.DataFrame, images: dict[tuple[str, str], Any]
) -> bytes:
    """The latent's reference images (in rank order) with its mask overlaid and their class
    and image-level activation as captions; one colour scale for the whole grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in refs.to_dict("records") if (r["shard"], r["key"]) in images]
    pictures = [images[(r["shard"], r["key"])] for r in rows]
    cols = 5
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if rows:
        codes = maker.codes(pictures)
        grids = maker.patch_grids(codes, [latent])[:, 0]
        vmax = float(grids.max()) or None
        for ax, row, picture, grid in zip(axes.flat, rows, pictures, grids, strict=False):
            view = maker.view(picture)
            ax.imshow(overlay(view, grid, vmax=vmax, scale=max(1, 160 // view.width)))
            ax.set_title(f"{row['class']}\n{row['value']:.3g}", fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; cursor: pointer; position: sticky; top: 0; }
td.text { text-align: left; }
.latent { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
.scroll { max-height: 32em; overflow-y: auto; display: inline-block; }
"""

_SORT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.order !== 'asc';
    th.dataset.order = up ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_COLUMNS = [
    ("latent", "latent"),
    ("frequency", "frequency"),
    ("token_frequency", "token freq."),
    ("mean_activation", "mean act."),
    ("entropy", "entropy"),
    ("n_references", "refs"),
    ("dataset_count", "tokens > tau"),
    ("top_classes", "top classes (share of tokens > tau)"),
]


def _cell(name: str, value: Any, sections: set[int]) -> str:
    if name == "latent":
        text = f'<a href="#latent-{value}">{value}</a>' if value in sections else str(value)
        return f'<td data-v="{value}">{text}</td>'
    if name == "top_classes":
        return f'<td class="text" data-v="{html.escape(str(value))}">{html.escape(str(value))}</td>'
    if isinstance(value, float):
        shown = "" if np.isnan(value) else f"{value:.4g}"
        return f'<td data-v="{"" if np.isnan(value) else value}">{shown}</td>'
    return f'<td data-v="{value}">{value}</td>'


def render(
    summary: dict[str, Any],
    table: pd.DataFrame,
    scatter: bytes,
    sections: list[tuple[int, bytes]],
) -> str:
    """The HTML text of the report."""
    selected = {j for j, _ in sections}
    columns = [(c, t) for c, t in _COLUMNS if c in table.columns]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in columns)
    body = []
    for row in table[[c for c, _ in columns]].itertuples(index=False):
        cells = "".join(_cell(c, v, selected) for (c, _), v in zip(columns, row, strict=True))
        body.append(f"<tr>{cells}</tr>")
    by_latent = table.set_index("latent")
    parts = []
    for j, grid in sections:
        r = by_latent.loc[j]
        entropy = "n/a (dead)" if np.isnan(r.entropy) else f"{r.entropy:.3f}"
        parts.append(
            f'<section class="latent" id="latent-{j}"><h2>Latent {j}</h2>'
            f"<p>frequency {r.frequency:.4g} (tokens {r.token_frequency:.4g}), mean activation "
            f"{r.mean_activation:.4g}, label entropy {entropy}, {int(r.n_references)} reference "
            f"images; top classes: {html.escape(str(r.get('top_classes', '')))}</p>"
            f'<img class="grid" alt="reference images of latent {j}" src="{_data_uri(grid)}">'
            '<p><a href="#top">back to the index</a></p></section>'
        )
    title = f"PatchSAE latents: {summary.get('model')} layer {summary.get('layer')}"
    facts = (
        f"{summary.get('n_latents'):,} latents, {summary.get('dead_latents'):,} dead; "
        f"{summary.get('images'):,} images ({summary.get('tokens'):,} tokens) from "
        f"{html.escape(str(summary.get('data')))}; image-level activation = "
        f"{summary.get('aggregate')} over {summary.get('image_tokens')} tokens; "
        f"k = {summary.get('k')}, tau = {summary.get('tau')}; SAE {html.escape(str(summary.get('run_dir')))}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body><a id="top"></a><h1>{html.escape(title)}</h1>
<p>{facts}</p>
<img id="scatter" alt="log10 frequency vs log10 mean activation" src="{_data_uri(scatter)}">
<h2>Latents</h2><p>Click a column header to sort; linked latents have a section below.</p>
<div class="scroll"><table class="sortable" id="latents"><thead><tr>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table></div>
{"".join(parts)}
<script>{_SORT}</script>
</body></html>
"""


def write_report(
    run_dir: str | Path,
    *,
    analysis: str | Path | None = None,
    latents: list[int] | None = None,
    frequent: int = 12,
    bands: int = 4,
    per_band: int = 3,
    device: str = "cpu",
    mlflow: bool = True,
) -> Path:
    """Write ``report.html``, ``scatter.png`` and ``latents/latent_J.png`` (reference grids) into
    the analysis folder, and log them to the SAE's MLflow run."""
    sae: TrainedSAE = load_trained(run_dir)
    folder = Path(analysis) if analysis else Path(run_dir) / "analysis"
    table, refs, summary = read_tables(folder, sae)
    if latents:
        sae.check_latents(latents)
    chosen = select_latents(table, frequent=frequent, bands=bands, per_band=per_band, named=latents)
    wanted = refs[refs.latent.isin(chosen)]
    keys: dict[str, set[str]] = defaultdict(set)
    for shard, key in zip(wanted.shard, wanted.key, strict=True):
        keys[shard].add(key)
    images = {}
    for shard, shard_keys in keys.items():
        try:
            found = fetch_samples(shard, shard_keys)
        except OSError as err:
            log.warning("cannot read reference images from %s (%s); left out", shard, err)
            continue
        for key, sample in found.items():
            images[(shard, key)] = decode_image(sample)
    maker = MaskMaker(sae, pretrained=summary.get("options", {}).get("pretrained"), device=device)
    with torch.no_grad():
        sections = [
            (
                j,
                reference_grid_png(
                    maker, j, wanted[wanted.latent == j].sort_values("rank"), images
                ),
            )
            for j in chosen
        ]
    scatter = scatter_png(table)
    text = render(summary, table, scatter, sections)
    # The plots also as their own PNG files (MLflow previews them as images).
    atomic_write(folder / "scatter.png", lambda p: p.write_bytes(scatter), "the scatter plot")
    (folder / "latents").mkdir(exist_ok=True)
    for j, grid in sections:
        atomic_write(folder / "latents" / f"latent_{j}.png", partial(Path.write_bytes, data=grid))
    path = folder / REPORT
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), "the report")
    if mlflow:  # the analysis itself was logged by analyze
        log_to_mlflow(sae, folder, only=[REPORT, "scatter.png", "latents"])
    return path
