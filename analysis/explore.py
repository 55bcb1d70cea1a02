"""``patchsae explore``: a local web app (Gradio) for looking at one image through the SAE.

Shape legend: T tokens (CLS first, then the patches), F latents, h x w patch grid.

Upload an image or pick one of the analysed images: the app shows its image-level activation
(the mean over its tokens) over every latent with the top ones marked, and lists them. Choosing
a latent shows its mask on the image, its statistics and its reference images from
``patchsae analyze``; clicking the mask picks a patch and lists that patch's own top latents.
With ``--adapted WEIGHTS`` (other weights of the same CLIP) the two models run side by side and
the image's top latents are grouped as shared, base-only and adapted-only.

:class:`Explorer` holds everything the app computes, without any UI, so that it can be used (and
tested) on its own; :func:`build_app` lays it out with Gradio.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL.Image
import torch
from patchsae.analysis.masks import MaskMaker, overlay
from patchsae.analysis.model import AnalysisError, load_trained
from patchsae.analysis.outputs import read_tables
from torch import Tensor

log = logging.getLogger(__name__)

MODELS = ("base", "adapted")
GROUPS = ("shared", "base-only", "adapted-only")
DISPLAY = 256
CSS = "#latents { max-height: 420px; overflow-y: auto; }"
"""Side, in pixels, that masks are drawn at (nearest upsampling: one block per patch)."""


@dataclass
class ImageView:
    """One image through each model: its SAE codes and image-level activations."""

    image: PIL.Image.Image
    """As the model sees it (resized and cropped)."""
    codes_TF: dict[str, Tensor]
    """Per model, the codes of every token, kept sparse."""
    mean_F: dict[str, Tensor]

    def top(self, model: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` latents of largest image-level activation (above zero), with it."""
        values, index = self.mean_F[model].topk(min(k, len(self.mean_F[model])))
        return [(int(j), float(v)) for j, v in zip(index, values, strict=True) if v > 0]


class Explorer:
    """The SAE, its CLIP (and an adapted one) and the analysis tables, for the app."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        analysis: str | Path | None = None,
        adapted: str | None = None,
        device: str = "cpu",
        top: int = 10,
        n_examples: int = 8,
    ) -> None:
        if top < 1:
            raise AnalysisError(f"--top {top}: must be >= 1")
        self.sae = load_trained(run_dir)
        self.top_k = top
        folder = Path(analysis) if analysis else Path(run_dir) / "analysis"
        table, self.refs, self.summary = read_tables(
            folder, self.sae, fix=" (the explorer shows its statistics and reference images), "
            "or pass --analysis DIR",
        )  # fmt: skip
        self.table = table.set_index("latent")
        base_weights = self.summary.get("options", {}).get("pretrained")
        self.makers = {"base": MaskMaker(self.sae, pretrained=base_weights, device=device)}
        if adapted is not None:
            self.makers["adapted"] = MaskMaker(self.sae, pretrained=adapted, device=device)
        self.adapted = adapted
        self._images: dict[tuple[str, str], PIL.Image.Image] = {}
        self._examples_dir = Path(tempfile.mkdtemp(prefix="patchsae-explore-"))
        self.examples = self._write_examples(n_examples)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.makers)

    # --- one image ---------------------------------------------------------------------------

    def inspect(self, image: PIL.Image.Image) -> ImageView:
        codes, means = {}, {}
        for model, maker in self.makers.items():
            codes_TF = maker.codes([image])[0].cpu()
            codes[model] = codes_TF.to_sparse()
            means[model] = codes_TF.mean(dim=0)
        return ImageView(self.makers["base"].view(image), codes, means)

    def groups(self, view: ImageView) -> dict[str, list[int]]:
        """The image's top latents under both models: shared, base-only, adapted-only (each in
        order of activation under the model that has it)."""
        base = [j for j, _ in view.top("base", self.top_k)]
        if "adapted" not in self.makers:
            return {"shared": base, "base-only": [], "adapted-only": []}
        adapted = [j for j, _ in view.top("adapted", self.top_k)]
        return {
            "shared": [j for j in base if j in adapted],
            "base-only": [j for j in base if j not in adapted],
            "adapted-only": [j for j in adapted if j not in base],
        }

    def latent_choices(self, view: ImageView) -> list[tuple[str, int]]:
        """``(label, latent)`` for the latent picker: the image's top latents, grouped."""
        choices = []
        for group, latents in self.groups(view).items():
            for j in latents:
                acts = ", ".join(f"{m} {float(view.mean_F[m][j]):.3g}" for m in self.models)
                name = self._class_of(j)
                prefix = f"[{group}] " if "adapted" in self.makers else ""
                choices.append((f"{prefix}latent {j}: {acts} ({name})", j))
        return choices

    def _class_of(self, latent: int) -> str:
        """The class most of the latent's tokens above tau belong to, or "-"."""
        name = self.table.loc[latent, "top_class"]
        return name if isinstance(name, str) and name else "-"

    def grid(self, view: ImageView, model: str, latent: int) -> Tensor:
        """``[h, w]`` activation of ``latent`` on each patch."""
        self.sae.check_latents([latent])
        h, w = self.makers[model].grid
        column = view.codes_TF[model].index_select(1, torch.tensor([latent])).to_dense()[:, 0]
        return column[1:].reshape(h, w)

    def mask(
        self,
        view: ImageView,
        model: str,
        latent: int,
        vmax: float | None = None,
        patch: int | None = None,
    ) -> PIL.Image.Image:
        """The latent's mask over the image, drawn at about :data:`DISPLAY` pixels; ``patch``
        (row-major index) outlined in cyan."""
        from PIL import ImageDraw

        scale = max(1, DISPLAY // max(view.image.size))
        picture = overlay(view.image, self.grid(view, model, latent), vmax=vmax, scale=scale)
        if patch is not None:
            h, w = self.makers[model].grid
            cw, ch = picture.width / w, picture.height / h
            row, col = divmod(patch, w)
            box = (col * cw, row * ch, (col + 1) * cw - 1, (row + 1) * ch - 1)
            ImageDraw.Draw(picture).rectangle(box, outline=(0, 255, 255), width=2)
        return picture

    def masks(
        self, view: ImageView, latent: int, patch: int | None = None
    ) -> dict[str, PIL.Image.Image]:
        """The latent's mask under each model, on one colour scale (``patch`` outlined)."""
        vmax = max(float(self.grid(view, m, latent).max()) for m in self.models) or None
        return {m: self.mask(view, m, latent, vmax, patch) for m in self.models}

    def patch_at(self, view: ImageView, x: float, y: float, size: tuple[int, int]) -> int:
        """The patch (row-major index) under pixel ``(x, y)`` of a picture of ``size`` (W, H)."""
        h, w = self.makers["base"].grid
        col = min(max(int(x * w / size[0]), 0), w - 1)
        row = min(max(int(y * h / size[1]), 0), h - 1)
        return row * w + col

    def patch_top(self, view: ImageView, patch: int, k: int | None = None) -> pd.DataFrame:
        """The patch's top latents under each model (token ``patch + 1``; CLS is token 0)."""
        rows = []
        for model in self.models:
            codes_F = view.codes_TF[model].index_select(0, torch.tensor([patch + 1])).to_dense()[0]
            values, index = codes_F.topk(min(k or self.top_k, len(codes_F)))
            for rank, (j, v) in enumerate(zip(index.tolist(), values.tolist(), strict=True)):
                if v > 0:
                    rows.append({"model": model, "rank": rank + 1, "latent": j,
                                 "activation": round(v, 4), "top class": self._class_of(j)})  # fmt: skip
        return pd.DataFrame(rows, columns=["model", "rank", "latent", "activation", "top class"])

    def activation_plot(self, view: ImageView) -> PIL.Image.Image:
        """Image-level activation of every latent (one panel per model), the top ones marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(self.models), 1, figsize=(7.5, 1.9 * len(self.models)),
                                 dpi=100, squeeze=False)  # fmt: skip
        for ax, model in zip(axes[:, 0], self.models, strict=True):
            values = view.mean_F[model].numpy()
            active = np.nonzero(values > 0)[0]  # one line per active latent: fast at any width
            ax.vlines(active, 0, values[active], color="tab:grey", linewidth=0.8)
            top = view.top(model, self.top_k)
            ax.vlines([j for j, _ in top], 0, [v for _, v in top], color="tab:red", linewidth=1.6)
            for j, v in top:
                ax.annotate(str(j), (j, v), fontsize=7, ha="center", va="bottom", color="tab:red")
            ax.set_xlim(-0.5, len(values) - 0.5)
            ax.set_ylim(0, max(float(values.max()), 1e-6) * 1.15)
            ax.set_ylabel(f"{model}\nmean act.", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[-1, 0].set_xlabel("latent", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return PIL.Image.open(buf).convert("RGB")

    # --- one latent ---------------------------------------------------------------------------

    def latent_stats(self, latent: int) -> str:
        """The latent's row of the analysis, as Markdown."""
        self.sae.check_latents([latent])
        row = self.table.loc[latent]
        if bool(row["dead"]):
            return (
                f"**Latent {latent}** never fired on the {self.summary['images']} analysed images."
            )
        entropy = (
            "n/a (fewer than 10 references)" if row["entropy"] < 0 else f"{row['entropy']:.3f}"
        )
        return (
            f"**Latent {latent}** on the {self.summary['images']} analysed images "
            f"({self.summary['data']}): fires on {row['frequency']:.1%} of the images "
            f"({row['token_frequency']:.2%} of tokens), mean activation {row['mean_activation']:.4g} "
            f"where active; label entropy of its references {entropy}; classes "
            f"{row['top_classes'] or '-'}"
        )

    def references(self, latent: int) -> list[tuple[PIL.Image.Image, str]]:
        """The latent's reference images, its mask drawn on each (base model), with captions."""
        from patchsae.data.shards import decode_image, fetch_samples

        self.sae.check_latents([latent])
        rows = self.refs[self.refs.latent == latent].sort_values("rank").to_dict("records")
        wanted: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            if (r["shard"], r["key"]) not in self._images:
                wanted[r["shard"]].add(r["key"])
        for shard, keys in wanted.items():
            try:
                for key, sample in fetch_samples(shard, keys).items():
                    self._images[(shard, key)] = decode_image(sample)
            except OSError as err:
                log.warning("cannot read reference images from %s (%s); left out", shard, err)
        rows = [r for r in rows if (r["shard"], r["key"]) in self._images]
        if not rows:
            return []
        maker = self.makers["base"]
        pictures = [self._images[(r["shard"], r["key"])] for r in rows]
        with torch.no_grad():
            grids = maker.patch_grids(maker.codes(pictures), [latent])[:, 0]
        vmax = float(grids.max()) or None
        out = []
        for r, picture, grid in zip(rows, pictures, grids, strict=True):
            view = maker.view(picture)
            scale = max(1, 160 // max(view.size))
            caption = f"{r['class'] if r['class'] is not None else r['label']} · {r['value']:.3g}"
            out.append((overlay(view, grid, vmax=vmax, scale=scale), caption))
        return out

    # --- examples -----------------------------------------------------------------------------

    def _write_examples(self, n: int) -> list[str]:
        """Up to ``n`` analysed images (the first reference of the most frequent classes'
        purest latents, else any), as PNG files the app offers to pick."""
        from patchsae.data.shards import decode_image, fetch_samples

        if n < 1:
            return []
        refs = self.refs[self.refs["rank"] == 0]
        picks = refs.drop_duplicates("label").head(n) if "label" in refs else refs.head(n)
        paths = []
        for shard, group in picks.groupby("shard"):
            try:
                found = fetch_samples(shard, set(group.key))
            except OSError as err:
                log.warning("cannot read example images from %s (%s)", shard, err)
                continue
            for key in group.key:
                if key in found:
                    path = self._examples_dir / f"{Path(shard).stem}-{key}.png"
                    decode_image(found[key]).save(path)
                    paths.append(str(path))
        return sorted(paths)


class _Handlers:
    """The app's event handlers: what each user action computes, through the explorer."""

    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer

    def on_image(self, image: Any) -> tuple[Any, ...]:
        import gradio as gr

        ex = self.explorer
        if image is None:
            return None, None, gr.update(choices=[], value=None), "", None
        view = ex.inspect(image)
        choices = ex.latent_choices(view)
        groups = ex.groups(view)
        summary = (
            "  \n".join(f"**{g}** ({len(groups[g])}): {', '.join(map(str, groups[g])) or '-'}"
                        for g in GROUPS)  # fmt: skip
            if ex.adapted else
            f"Top {len(choices)} latents by image-level activation (mean over all tokens)."
        )  # fmt: skip
        first = choices[0][1] if choices else None
        plot = ex.activation_plot(view)
        return view, plot, gr.update(choices=choices, value=first), summary, first

    def on_latent(self, view: ImageView | None, latent: Any) -> list[Any]:
        ex = self.explorer
        if view is None or latent is None:
            return [*([None] * len(ex.models)), "", [], latent]
        masks = ex.masks(view, int(latent))
        return [*(masks[m] for m in ex.models), ex.latent_stats(int(latent)),
                ex.references(int(latent)), int(latent)]  # fmt: skip

    def on_patch(self, view: ImageView | None, latent: Any, evt: Any) -> list[Any]:
        """``evt``: Gradio's SelectData of a click on a mask (pixel coordinates). Returns the
        patch's top latents, its label and the masks with the patch outlined."""
        ex = self.explorer
        if view is None or latent is None:
            return [None, "", *([None] * len(ex.models))]
        x, y = evt.index
        scale = max(1, DISPLAY // max(view.image.size))
        patch = ex.patch_at(view, x, y, (view.image.width * scale, view.image.height * scale))
        w = ex.makers["base"].grid[1]
        masks = ex.masks(view, int(latent), patch)
        label = f"Patch {patch} (row {patch // w}, column {patch % w})"
        return [ex.patch_top(view, patch), label, *(masks[m] for m in ex.models)]


def build_app(explorer: Explorer) -> Any:
    """The Gradio Blocks app around ``explorer``."""
    import gradio as gr

    sae, models = explorer.sae, explorer.models
    title = (
        f"### PatchSAE explorer: {sae.run_dir}\n{sae.model.name} layer {sae.model.layer}, "
        f"{sae.n_latents} latents; analysis of {explorer.summary['images']} images "
        f"({explorer.summary['data']})"
    )
    if explorer.adapted:
        title += f"; base vs adapted weights {explorer.adapted}"
    handlers = _Handlers(explorer)

    def on_patch(view: Any, latent: Any, evt: gr.SelectData) -> list[Any]:
        return handlers.on_patch(view, latent, evt)

    # Gradio finds the event argument by its annotation; spelled as a string (this module's
    # postponed annotations) it would not resolve, so it is set to the class itself.
    on_patch.__annotations__["evt"] = gr.SelectData

    with gr.Blocks(title="PatchSAE explorer") as app:
        view_state = gr.State(None)
        gr.Markdown(title)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", sources=["upload", "clipboard"], label="image",
                                 elem_id="image", format="png", height=280)  # fmt: skip
                if explorer.examples:
                    gr.Examples(explorer.examples, inputs=image, label="analysed images")
            with gr.Column(scale=2):
                plot = gr.Image(label="image-level activation over all latents", format="png",
                                interactive=False, elem_id="activation-plot")  # fmt: skip
                groups = gr.Markdown(elem_id="groups")
        with gr.Row():
            with gr.Column(scale=1):
                latent = gr.Radio(choices=[], label="top latents (pick one)", elem_id="latents")
                number = gr.Number(label="or any latent (Enter)", precision=0, minimum=0,
                                   maximum=sae.n_latents - 1, elem_id="latent-number")  # fmt: skip
            mask_images = [
                gr.Image(
                    label=f"latent mask, {m} model (click a patch)",
                    format="png",
                    interactive=False,
                    elem_id=f"mask-{m}",
                    height=280,
                    scale=1,
                )  # fmt: skip
                for m in models
            ]
            with gr.Column(scale=1):
                stats = gr.Markdown(elem_id="latent-stats")
        with gr.Row():
            with gr.Column(scale=1):
                patch_label = gr.Markdown("Click a mask to see a patch's top latents.",
                                          elem_id="patch-label")  # fmt: skip
                patch_table = gr.Dataframe(label="the clicked patch's top latents",
                                           interactive=False, elem_id="patch-latents")  # fmt: skip
            with gr.Column(scale=2):
                refs = gr.Gallery(label="reference images (base model)", columns=5, height=360,
                                  elem_id="references")  # fmt: skip

        image.change(handlers.on_image, image, [view_state, plot, latent, groups, number])
        outputs = [*mask_images, stats, refs, number]
        latent.change(handlers.on_latent, [view_state, latent], outputs)
        number.submit(handlers.on_latent, [view_state, number], outputs)
        for picture in mask_images:
            picture.select(on_patch, [view_state, latent], [patch_table, patch_label, *mask_images])
    return app


def explore(
    run_dir: str | Path,
    *,
    analysis: str | Path | None = None,
    adapted: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    top: int = 10,
) -> None:
    """``patchsae explore``: build the explorer and serve it until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise AnalysisError(
            f"the explorer needs Gradio ({err}); install it with pip install 'patchsae[explore]'"
        ) from err
    explorer = Explorer(run_dir, analysis=analysis, adapted=adapted, device=device, top=top)
    app = build_app(explorer)
    print(f"PatchSAE explorer on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        allowed_paths=[str(explorer._examples_dir)],
        css=CSS,
    )
