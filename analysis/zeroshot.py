"""Zero-shot classification through the CLIP's text tower, with the SAE spliced into the ViT.

Shape legend: B images, T tokens (CLS + patches), D width, F latents, C classes, E embedding.

The classifier is open_clip's own (:func:`open_clip.build_zero_shot_classifier`): each prompt's
text features normalised, averaged over the templates, normalised again. The image side runs
in two parts: the blocks up to the SAE's hook once (:meth:`SplicedCLIP.hooked`), then, for each
variant, the hooked residual stream with the chosen tokens replaced (:meth:`SplicedCLIP.splice`)
through the remaining blocks and the head (:meth:`SplicedCLIP.features`). So a sweep of many
splices (or of latent masks) reruns only the blocks after the hook.

Variants (``eval-zeroshot``): ``clip`` (nothing replaced; equals the model's own forward),
``spliced`` (the SAE's reconstruction ``relu((x - b_dec) W_enc + b_enc) W_dec + b_dec`` in place
of the chosen tokens, nothing else added) and ``spliced_error`` (the reconstruction plus the
SAE's error ``x - x_hat``: equal to ``clip`` up to float rounding, a check that the splice is
where it should be and exact).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from patchsae.analysis.model import (
    AnalysisError,
    TrainedSAE,
    activation_source,
    load_sae_clip,
    load_trained,
    read_class_names,
    select_tokens,
)
from patchsae.analysis.stats import encode
from patchsae.data.activations import TOKEN_SELECTIONS
from torch import Tensor

log = logging.getLogger(__name__)

SPLICE_TOKENS = TOKEN_SELECTIONS
VARIANTS = ("clip", "spliced", "spliced_error")


def templates_for(spec: str, model_name: str) -> list[Any]:
    """Prompt templates: ``openai`` (the 80 ImageNet templates of CLIP, from open_clip), ``demo``
    (the demo captions' wording), ``auto`` (``demo`` for the demo CLIP, else ``openai``) or a
    text file with one template per line, ``{}`` where the class name goes."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    from patchsae.data.activations import DEMO_MODEL
    from patchsae.data.demo_clip import PROMPTS

    if spec == "auto":
        spec = "demo" if model_name == DEMO_MODEL else "openai"
    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "demo":
        return list(PROMPTS)
    path = Path(spec)
    if not path.is_file():
        raise AnalysisError(
            f"--templates {spec!r}: use openai, demo, auto or a text file of templates"
        )
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise AnalysisError(
            f"--templates {path}: every line must hold {{}} where the class name goes"
            + (f" (not: {bad[0]!r})" if bad else " (the file is empty)")
        )
    return lines


@dataclass
class SplicedCLIP:
    """The SAE's CLIP, split at the SAE's hook, with the text-side classifier."""

    sae: TrainedSAE
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device
    source: Any = field(init=False)

    def __post_init__(self) -> None:
        self.source, _ = activation_source(
            self.sae, device=self.device, clip=(self.model, self.preprocess)
        )
        self.model.to(self.device)
        self.tensors = self.sae.to(self.device).tensors
        self.visual = self.model.visual
        self.tail_blocks = list(self.visual.transformer.resblocks)[self.source.layer + 1 :]

    @classmethod
    def load(
        cls, sae: TrainedSAE, *, pretrained: str | None = None, device: str = "cpu"
    ) -> SplicedCLIP:
        import open_clip

        model, preprocess = load_sae_clip(sae, pretrained)
        tokenizer = open_clip.get_tokenizer(sae.model.name)
        return cls(sae, model, preprocess, tokenizer, torch.device(device))

    @torch.no_grad()
    def classifier(self, names: list[str], templates: list[Any]) -> Tensor:
        """``[C, E]`` normalised class embeddings."""
        from open_clip import build_zero_shot_classifier

        weights_EC = build_zero_shot_classifier(
            self.model, self.tokenizer, names, templates, device=self.device
        )
        return weights_EC.T.float()

    @torch.no_grad()
    def hooked(self, pixels_B3HW: Tensor) -> Tensor:
        """``[B, T, D]`` residual stream after the hooked block."""
        return self.source.all_tokens(pixels_B3HW)

    @torch.no_grad()
    def reconstruct(self, x_ND: Tensor, latent_mask_F: Tensor | None = None) -> Tensor:
        """The SAE's reconstruction of ``x``; ``latent_mask_F`` multiplies the codes first."""
        codes = encode(x_ND, self.tensors)
        if latent_mask_F is not None:
            codes = codes * latent_mask_F
        return (codes @ self.tensors["W_dec"] + self.tensors["b_dec"]).to(x_ND.dtype)

    @torch.no_grad()
    def splice(
        self,
        x_BTD: Tensor,
        tokens: str = "all",
        *,
        add_error: bool = False,
        latent_mask_F: Tensor | None = None,
    ) -> Tensor:
        """``x`` with the ``tokens`` (all, cls or patches) replaced by their reconstruction
        (plus the SAE's error when ``add_error``); the other tokens unchanged."""
        if tokens not in SPLICE_TOKENS:
            raise AnalysisError(f"--tokens {tokens!r}: use one of {', '.join(SPLICE_TOKENS)}")
        out = x_BTD.clone()
        chosen = select_tokens(out, tokens)  # a view into out
        flat = chosen.reshape(-1, chosen.shape[-1])
        recon = self.reconstruct(flat, latent_mask_F)
        if add_error:
            recon = recon + (flat - recon)
        chosen.copy_(recon.reshape(chosen.shape))
        return out

    @torch.no_grad()
    def features(self, x_BTD: Tensor) -> Tensor:
        """``[B, E]`` normalised image features: ``x`` (the hooked block's output) through the
        remaining blocks, the pooling and the projection, as open_clip's own forward runs
        them."""
        transformer = self.visual.transformer
        x = x_BTD if getattr(transformer, "batch_first", True) else x_BTD.transpose(0, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            for block in self.tail_blocks:
                x = block(x)
            if not getattr(transformer, "batch_first", True):
                x = x.transpose(0, 1)
            pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
        return F.normalize(pooled.float(), dim=-1)


@dataclass
class Accuracy:
    """Correct and total counts per class."""

    correct_C: Tensor
    total_C: Tensor

    @property
    def overall(self) -> float:
        return float(self.correct_C.sum()) / max(int(self.total_C.sum()), 1)

    def per_class(self) -> list[float | None]:
        return [
            float(c) / int(t) if int(t) else None
            for c, t in zip(self.correct_C, self.total_C, strict=True)
        ]


def labelled_batches(
    urls: str,
    preprocess: Any,
    batch_images: int,
    *,
    classes: tuple[int, str] | None = None,
    refuse: Tensor | None = None,
    refused: str = "",
) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """``(pixels, labels, keys)`` batches of the shards ``urls``, in shard then tar order.

    ``classes``: ``(C, what)``, labels must be in ``[0, C)``; the first that is not raises
    :class:`AnalysisError` naming it, ``C`` and ``what`` (the names' source and the fix).
    ``refuse``: sorted image digests (an analysis's ``image_digests``) that no image here may
    have: the first that does raises :class:`AnalysisError` naming it and ``refused``."""
    from patchsae.data.shards import decode_image, expand_urls, image_digest, iter_samples

    pixels, labels, keys = [], [], []
    for url in expand_urls(urls):
        for sample in iter_samples(url):
            if refuse is not None and len(refuse):
                digest = torch.tensor([image_digest(sample)])
                at = int(torch.searchsorted(refuse, digest))
                if at < len(refuse) and int(refuse[at]) == int(digest):
                    raise AnalysisError(
                        f"image {sample['__key__']} of {url} is also an image of {refused} (the "
                        "same bytes): latents would be chosen on the images they are scored on; "
                        "evaluate on images the analysis did not read"
                    )
            label = int(sample["cls"].decode().strip())
            if classes is not None and not 0 <= label < classes[0]:
                raise AnalysisError(
                    f"label {label} of image {sample['__key__']} in {urls} has no class name: "
                    f"{classes[0]} {classes[1]}"
                )
            pixels.append(preprocess(decode_image(sample)))
            labels.append(label)
            keys.append(f"{url}:{sample['__key__']}")
            if len(pixels) == batch_images:
                yield torch.stack(pixels), torch.tensor(labels), keys
                pixels, labels, keys = [], [], []
    if pixels:
        yield torch.stack(pixels), torch.tensor(labels), keys


def eval_zeroshot(
    run_dir: str | Path,
    data: str,
    *,
    classnames: str | None = None,
    templates: str = "auto",
    tokens: str = "all",
    batch_images: int = 64,
    pretrained: str | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """``patchsae eval-zeroshot``: accuracy of every variant, overall and per class, written to
    ``OUT/zeroshot.json`` (default ``RUN_DIR/eval``) and logged to the SAE's MLflow run as
    ``eval/zeroshot_acc``, ``eval/zeroshot_acc_spliced`` and ``eval/zeroshot_acc_spliced_error``."""
    from patchsae.data.shards import expand_urls

    if batch_images < 1:
        raise AnalysisError(f"--batch-images {batch_images}: must be >= 1")
    if tokens not in SPLICE_TOKENS:
        raise AnalysisError(f"--tokens {tokens!r}: use one of {', '.join(SPLICE_TOKENS)}")
    sae = load_trained(run_dir)
    urls = expand_urls(data)
    names = read_class_names(classnames, urls)
    if names is None:
        raise AnalysisError(
            f"no class names for {data}: pass --classnames FILE (a JSON list or one name per "
            "line, index = label), or put a classes.json beside the shards"
        )
    prompts = templates_for(templates, sae.model.name)
    clip = SplicedCLIP.load(sae, pretrained=pretrained, device=device)
    text_CE = clip.classifier(names, prompts)
    C = len(names)
    counts = {v: Accuracy(torch.zeros(C, dtype=torch.int64), torch.zeros(C, dtype=torch.int64))
              for v in VARIANTS}  # fmt: skip
    max_diff = 0.0
    given = f"names were given ({classnames or 'classes.json'}); pass names that match the labels"
    for pixels, labels, _ in labelled_batches(
        data, clip.preprocess, batch_images, classes=(C, given)
    ):
        x = clip.hooked(pixels)
        logits = {
            "clip": clip.features(x) @ text_CE.T,
            "spliced": clip.features(clip.splice(x, tokens)) @ text_CE.T,
            "spliced_error": clip.features(clip.splice(x, tokens, add_error=True)) @ text_CE.T,
        }
        max_diff = max(max_diff, float((logits["spliced_error"] - logits["clip"]).abs().max()))
        labels = labels.to(text_CE.device)
        for variant, value in logits.items():
            hit = (value.argmax(dim=-1) == labels).long()
            counts[variant].correct_C.index_add_(0, labels.cpu(), hit.cpu())
            counts[variant].total_C.index_add_(0, labels.cpu(), torch.ones_like(hit.cpu()))
    n = int(counts["clip"].total_C.sum())
    if n == 0:
        raise AnalysisError(f"no labelled images in {data}; check the URLs")
    result = {
        "run_dir": str(run_dir),
        "data": data,
        "images": n,
        "classes": names,
        "templates": templates if templates in ("openai", "demo", "auto") else str(templates),
        "n_templates": len(prompts),
        "tokens": tokens,
        "accuracy": {v: counts[v].overall for v in VARIANTS},
        "per_class": {v: counts[v].per_class() for v in VARIANTS},
        "max_abs_logit_diff_spliced_error": max_diff,
    }
    out_dir = Path(out) if out else Path(run_dir) / "eval"
    _write_json(out_dir / "zeroshot.json", result)
    if mlflow:
        _log_metrics(sae, out_dir / "zeroshot.json", result)
    return result


def _write_json(path: Path, record: dict[str, Any]) -> None:
    from patchsae.trainer.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1)
    atomic_write(path, lambda p: p.write_text(text), "the zero-shot results")


def _log_metrics(sae: TrainedSAE, path: Path, result: dict[str, Any]) -> None:
    """The accuracies as metrics of the SAE's own MLflow run (at its final step) and the JSON as
    an artifact under ``eval/``."""
    step = int(sae.cfg_json.get("step") or 0)
    names = {"clip": "eval/zeroshot_acc", "spliced": "eval/zeroshot_acc_spliced",
             "spliced_error": "eval/zeroshot_acc_spliced_error"}  # fmt: skip
    metrics = [(key, result["accuracy"][variant], step) for variant, key in names.items()]
    log_eval_results(sae, metrics, [path], "the zero-shot results")


def log_eval_results(
    sae: TrainedSAE,
    metrics: list[tuple[str, float, int]],
    files: list[Path],
    what: str,
    artifact_path: str = "eval",
) -> None:
    """``(key, value, step)`` metrics and ``files`` (artifacts under ``artifact_path``) to the
    SAE's own MLflow run. A tracking failure is a warning: the files stay where they are."""
    from patchsae.analysis.outputs import mlflow_target

    run_id, uri = mlflow_target(sae)
    if not run_id:
        log.warning(
            "the SAE's run has no MLflow run on record; %s stay in %s", what, files[0].parent
        )
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for key, value, step in metrics:
            client.log_metric(run_id, key, value, step=step)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    except Exception as err:  # noqa: BLE001 - tracking never loses the results
        log.warning(
            "could not log %s to MLflow run %s at %s (%s: %s); they are in %s",
            what, run_id, uri, type(err).__name__, err, files[0].parent,
        )  # fmt: skip
    else:
        print(
            f"logged {what} to MLflow run {run_id} ({len(metrics)} metrics, artifacts "
            f"{artifact_path}/)"
        )


class ZeroShotMonitor:
    """Zero-shot accuracy of the SAE being trained (``eval`` section of a recipe), without and
    with it spliced in. The CLIP, the classifier and the CLIP-only accuracy are computed once;
    each :meth:`evaluate` streams the held-out images again through the blocks and the SAE."""

    def __init__(self, cfg: Any, run_dir: Path, device: torch.device) -> None:
        from patchsae.data.shards import expand_urls

        self.cfg = cfg.eval
        urls = expand_urls(self.cfg.data)
        names = read_class_names(self.cfg.classnames, urls)
        if names is None:
            raise AnalysisError(
                f"eval.data {self.cfg.data} has no classes.json beside it; set eval.classnames"
            )
        self.names = names
        self.prompts = templates_for(self.cfg.templates, cfg.model.name)
        self.base = TrainedSAE(run_dir, {}, {"config": cfg.to_dict()}, cfg.model)
        self.device = device
        self.clip: SplicedCLIP | None = None
        self.text_CE: Tensor | None = None
        self.clip_accuracy: float | None = None

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        assert self.clip is not None
        seen, limit = 0, self.cfg.max_images
        names = "names; set eval.classnames to names that match the labels of eval.data"
        for pixels, labels, _ in labelled_batches(
            self.cfg.data,
            self.clip.preprocess,
            self.cfg.batch_images,
            classes=(len(self.names), names),
        ):
            if limit is not None and seen + len(labels) > limit:
                pixels, labels = pixels[: limit - seen], labels[: limit - seen]
            yield pixels, labels
            seen += len(labels)
            if limit is not None and seen >= limit:
                return

    @torch.no_grad()
    def evaluate(self, tensors: dict[str, Tensor]) -> dict[str, float]:
        """``eval/zeroshot_acc`` and ``eval/zeroshot_acc_spliced`` for the SAE ``tensors``
        (exported form: acting on raw activations)."""
        sae = replace(self.base, tensors={k: v.detach().float() for k, v in tensors.items()})
        if self.clip is None:
            self.clip = SplicedCLIP.load(sae, device=str(self.device))
            self.text_CE = self.clip.classifier(self.names, self.prompts)
        else:
            self.clip.tensors = sae.to(self.device).tensors
        assert self.text_CE is not None
        correct, spliced, total = 0, 0, 0
        for pixels, labels in self._batches():
            x = self.clip.hooked(pixels)
            labels = labels.to(self.text_CE.device)
            if self.clip_accuracy is None:
                logits = self.clip.features(x) @ self.text_CE.T
                correct += int((logits.argmax(-1) == labels).sum())
            logits = self.clip.features(self.clip.splice(x, self.cfg.tokens)) @ self.text_CE.T
            spliced += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        if total == 0:
            raise AnalysisError(f"eval.data {self.cfg.data} holds no labelled images")
        if self.clip_accuracy is None:
            self.clip_accuracy = correct / total
        return {
            "eval/zeroshot_acc": self.clip_accuracy,
            "eval/zeroshot_acc_spliced": spliced / total,
        }
