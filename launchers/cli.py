"""The ``patchsae`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: printed without a trace."""
    from patchsae.analysis.model import AnalysisError
    from patchsae.data.activations import ModelError
    from patchsae.data.cache import CacheError
    from patchsae.data.shards import ShardError
    from patchsae.trainer.checkpoint import CheckpointError, DiskFullError
    from patchsae.trainer.config import ConfigError
    from patchsae.trainer.loop import TrainingDiverged
    from patchsae.trainer.tracking import SyncError

    return (
        AnalysisError,
        CacheError,
        ConfigError,
        ModelError,
        ShardError,
        CheckpointError,
        SyncError,
        DiskFullError,
        TrainingDiverged,
    )


EXIT_DIVERGED = 3
"""Exit status of a run stopped by non-finite steps (2: bad input; 1: a crash)."""


def _log_progress() -> None:
    """Show the project's own INFO messages (progress), without open_clip's chatter."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("patchsae").setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> int:
    from patchsae.trainer.config import load_config
    from patchsae.trainer.loop import train

    cfg = load_config(args.config, args.set)  # validated before any data is read
    summary = train(cfg, resume=args.resume)
    return 0 if summary["step"] > 0 else 1


def _cache(args: argparse.Namespace) -> int:
    from patchsae.data.cache_writer import CacheOptions, build_cache
    from patchsae.trainer.config import load_config

    _log_progress()
    cfg = load_config(args.config, args.set)
    options = CacheOptions(
        out=args.out,
        dtype=args.dtype,
        shard_images=args.shard_images,
        device=args.device,
        max_batches=args.max_batches,
    )
    out = build_cache(cfg, options)
    if out is not None:
        print(f"activation cache written to {out}")
    return 0


def _make_demo_data(args: argparse.Namespace) -> int:
    from patchsae.data.demo import make_demo_data

    out = make_demo_data(
        args.out, n_images=args.n_images, seed=args.seed, split=args.split, style=args.style
    )
    print(f"demo shards written to {out}")
    return 0


def _make_demo_clip(args: argparse.Namespace) -> int:
    from patchsae.data.demo_clip import FINETUNE, DemoClipConfig, train_demo_clip

    _log_progress()
    cfg = dataclasses.replace(FINETUNE if args.init else DemoClipConfig(), seed=args.seed)
    given = {"steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup_steps}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    record = train_demo_clip(args.data, args.out, heldout=args.heldout, cfg=cfg, init=args.init)
    message = f"demo CLIP written to {args.out} in {record['train_seconds']:.0f} s"
    if "zeroshot_accuracy" in record:
        message += f"; zero-shot accuracy on {args.heldout}: {record['zeroshot_accuracy']:.1%}"
    if "init_zeroshot_accuracy" in record:
        message += f" (before fine-tuning: {record['init_zeroshot_accuracy']:.1%})"
    print(message)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from patchsae.analysis.analyze import AnalyzeOptions, analyze

    _log_progress()
    options = AnalyzeOptions(
        data=args.data,
        out=args.out,
        k=args.k,
        tau=args.tau,
        aggregate=args.aggregate,
        image_tokens=args.image_tokens,
        pretrained=args.pretrained,
        batch_images=args.batch_images,
        workers=args.workers,
        save_every=args.save_every,
        device=args.device,
        classes=args.classes,
        mlflow=not args.no_mlflow,
        max_batches=args.max_batches,
    )
    out = analyze(args.run_dir, options)
    if out is not None:
        print(f"analysis written to {out}")
    return 0


def _masks(args: argparse.Namespace) -> int:
    from patchsae.analysis.masks import write_masks

    written = write_masks(
        args.run_dir,
        args.image,
        latents=args.latents,
        top=args.top,
        out=args.out,
        pretrained=args.pretrained,
        device=args.device,
    )
    for path in written:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from patchsae.analysis.report import write_report

    path = write_report(
        args.run_dir,
        analysis=args.analysis,
        latents=args.latents,
        frequent=args.frequent,
        bands=args.bands,
        per_band=args.per_band,
        device=args.device,
        mlflow=not args.no_mlflow,
    )
    print(f"report written to {path}")
    return 0


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from patchsae.analysis.zeroshot import eval_zeroshot

    _log_progress()
    result = eval_zeroshot(
        args.run_dir,
        args.data,
        classnames=args.classnames,
        templates=args.templates,
        tokens=args.tokens,
        batch_images=args.batch_images,
        pretrained=args.pretrained,
        device=args.device,
        out=args.out,
        mlflow=not args.no_mlflow,
    )
    acc = result["accuracy"]
    print(
        f"zero-shot accuracy on {result['images']} images over {len(result['classes'])} classes: "
        f"CLIP {acc['clip']:.2%}, SAE spliced ({result['tokens']} tokens) {acc['spliced']:.2%}, "
        f"spliced + error {acc['spliced_error']:.2%} "
        f"(max logit difference to CLIP {result['max_abs_logit_diff_spliced_error']:.1e})"
    )
    return 0


def _eval_masking(args: argparse.Namespace) -> int:
    from patchsae.analysis.masking import eval_masking

    _log_progress()
    result = eval_masking(
        args.run_dir,
        args.data,
        analysis=args.analysis,
        ks=args.k,
        templates=args.templates,
        classnames=args.classnames,
        seed=args.seed,
        batch_images=args.batch_images,
        pretrained=args.pretrained,
        device=args.device,
        out=args.out,
        mlflow=not args.no_mlflow,
    )
    print(f"spliced accuracy {result['spliced_accuracy']:.2%} on {result['images']} images")
    print(f"{'selection':>9} {'mode':>4} " + " ".join(f"{r['k']:>6}" for r in result["rows"]
          if r["selection"] == "class" and r["mode"] == "on"))  # fmt: skip
    for selection in ("class", "random", "dataset"):
        for mode in ("on", "off"):
            accs = [r["accuracy"] for r in result["rows"]
                    if r["selection"] == selection and r["mode"] == mode]  # fmt: skip
            print(f"{selection:>9} {mode:>4} " + " ".join(f"{a:6.1%}" for a in accs))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from patchsae.analysis.adaptation import STATUSES, compare_models

    _log_progress()
    result = compare_models(
        args.run_dir,
        args.base,
        args.adapted,
        top=args.top,
        data=args.data,
        ks=args.k,
        templates=args.templates,
        seed=args.seed,
        batch_images=args.batch_images,
        device=args.device,
        out=args.out,
        mlflow=not args.no_mlflow,
    )
    print(f"top {result['top']} latents per class, base -> adapted:")
    for row in result["per_class"]:
        sizes = "  ".join(f"{s} {len(row[s]):3d}" for s in STATUSES)
        print(f"  {row['class']:<28} {sizes}  overlap {row['overlap']:.0%}")
    for model, acc in result.get("accuracy", {}).items():
        print(
            f"{model:>8} model on {result['data']}: zero-shot {acc['clip']:.1%}, "
            f"spliced {acc['spliced']:.1%}"
        )
    print(f"written to {args.out or Path(args.run_dir) / 'compare'}")
    return 0


def _explore(args: argparse.Namespace) -> int:
    from patchsae.analysis.explore import explore

    _log_progress()
    explore(
        args.run_dir,
        analysis=args.analysis,
        adapted=args.adapted,
        host=args.host,
        port=args.port,
        device=args.device,
        top=args.top,
    )
    return 0


def _sync_mlflow(args: argparse.Namespace) -> int:
    from patchsae.trainer.tracking import sync_unsent

    sent = sync_unsent(Path(args.run_dir), tracking_uri=args.tracking_uri)
    print(f"sent {sent} records from {args.run_dir}")
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train an SAE from a YAML recipe")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.lr=1e-3",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from the newest checkpoint in train.out_dir (no value), from the given "
        "checkpoint or run folder, or 'if-present': resume when train.out_dir has a checkpoint, "
        "else start fresh (for requeued jobs)",
    )
    p.set_defaults(func=_train)


def _add_cache(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="write the hooked CLIP activations of a recipe's shards to disk, once",
        description="One pass of the recipe's data.urls through its model (model.name, "
        "pretrained, layer, tokens), written as memory-mappable .npy shards with cache.json and "
        "each image's key; train from it with --set data.source=cache --set data.cache=OUT. "
        "Under torchrun each rank writes its share of the shards. An interrupted pass resumes "
        "when the same command runs again.",
    )
    p.add_argument("--config", required=True, help="YAML recipe (its model and data sections)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", required=True, help="the cache folder (new, or an unfinished cache)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--shard-images", type=int, default=1024, help="images per cache shard")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cache)


def _add_make_demo_data(sub: Any) -> None:
    p = sub.add_parser("make-demo-data", help="write the demo's WebDataset image shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        choices=("classes", "attributes"),
        default="classes",
        help="classes: the 8 labelled classes, balanced; attributes: shape, colour and texture "
        "drawn independently (captioned images for training the demo CLIP)",
    )
    p.add_argument(
        "--style",
        choices=("photo", "sketch"),
        default="photo",
        help="photo: coloured shapes on coloured backgrounds; sketch: the same shapes as greyscale "
        "outline drawings (the shifted domain of the base-vs-adapted demo)",
    )
    p.set_defaults(func=_make_demo_data)


def _add_make_demo_clip(sub: Any) -> None:
    p = sub.add_parser(
        "make-demo-clip", help="train the demo CLIP on captioned demo images (make-demo-data)"
    )
    p.add_argument("--data", required=True, help="captioned shards (the attributes split)")
    p.add_argument("--out", required=True, help="output folder (demo_clip.safetensors)")
    p.add_argument("--heldout", default=None, help="a classes split to report zero-shot accuracy")
    p.add_argument(
        "--init", default=None, help="demo CLIP weights to fine-tune instead of training anew"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default 200; 150 with --init)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 2e-3; 5e-4 with --init)"
    )
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up (default 50; 10 with --init)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_demo_clip)


def _add_analyze(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-latent statistics, reference images and class counts of a trained SAE",
        description="One streaming pass of image shards through the SAE's CLIP and the SAE. "
        "Under torchrun each rank reads its share of the shards and the results are reduced "
        "exactly; an interrupted pass resumes from its saved state.",
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json (or a checkpoint)")
    p.add_argument("--data", required=True, help="image shards (folder, brace pattern, file, ::)")
    p.add_argument("--out", default=None, help="results folder (default: RUN_DIR/analysis)")
    p.add_argument("--k", type=int, default=10, help="reference images per latent")
    p.add_argument("--tau", type=float, default=0.2, help="activation threshold of class counts")
    p.add_argument(
        "--aggregate",
        choices=("mean", "max"),
        default="mean",
        help="image-level activation: mean over the image's tokens (the paper) or max patch",
    )
    p.add_argument(
        "--image-tokens",
        choices=("all", "cls", "patches"),
        default=None,
        help="tokens of the image-level activation and the counts (default: the SAE's own "
        "model.tokens; all = CLS + patches)",
    )
    p.add_argument("--pretrained", default=None, help="other CLIP weights of the same model")
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--save-every", type=int, default=200, help="batches between state saves")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--classes", default=None, help="classes.json (default: beside the shards)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the SAE's MLflow run")
    p.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_analyze)


def _add_masks(sub: Any) -> None:
    p = sub.add_parser(
        "masks", help="per-patch masks of an image's top latents, overlaid on the image"
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--image", required=True, help="a PNG, JPEG or WebP file")
    p.add_argument(
        "--latents", type=int, nargs="+", default=None, help="these latents (default: the top)"
    )
    p.add_argument("--top", type=int, default=5, help="how many top latents (without --latents)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/masks)")
    p.add_argument("--pretrained", default=None, help="other CLIP weights of the same model")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_masks)


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="the latent report (scatter, table, reference images with masks) as HTML"
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--analysis", default=None, help="the analyze output (default RUN_DIR/analysis)")
    p.add_argument("--latents", type=int, nargs="+", default=None, help="latents to show as well")
    p.add_argument("--frequent", type=int, default=12, help="show the N most frequent latents")
    p.add_argument("--bands", type=int, default=4, help="log-frequency bands to sample from")
    p.add_argument("--per-band", type=int, default=3, help="latents sampled per band")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the SAE's MLflow run")
    p.set_defaults(func=_report)


def _add_eval_zeroshot(sub: Any) -> None:
    p = sub.add_parser(
        "eval-zeroshot", help="zero-shot accuracy without and with the SAE spliced into the CLIP"
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--data", required=True, help="labelled shards (brace or glob pattern)")
    p.add_argument(
        "--classnames", default=None, help="class names, JSON list or one per line (default: "
        "classes.json beside the shards)"
    )  # fmt: skip
    p.add_argument(
        "--templates", default="auto", help="openai (80 ImageNet templates), demo, auto "
        "(demo for the demo CLIP) or a file of templates with {}"
    )  # fmt: skip
    p.add_argument("--tokens", default="all", help="tokens to splice: all, cls or patches")
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--pretrained", default=None, help="other CLIP weights of the same model")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the SAE's MLflow run")
    p.set_defaults(func=_eval_zeroshot)


def _add_eval_masking(sub: Any) -> None:
    p = sub.add_parser(
        "eval-masking", help="zero-shot accuracy with each class's top-k latents kept or removed"
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--data", required=True, help="the evaluation split (not the analysis's)")
    p.add_argument(
        "--analysis", default=None, help="patchsae analyze output of the selection split "
        "(default RUN_DIR/analysis)"
    )  # fmt: skip
    p.add_argument(
        "--k",
        nargs="+",
        default=None,
        help="k values, 'all' for every latent (default: 1 2 5 10 50 100 500 1000 2000 all, "
        "up to the SAE's width)",
    )
    p.add_argument("--templates", default="auto", help="openai, demo, auto or a file")
    p.add_argument("--classnames", default=None, help="class names (default: the analysis's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--pretrained", default=None, help="other CLIP weights of the same model")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the SAE's MLflow run")
    p.set_defaults(func=_eval_masking)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="base vs adapted CLIP under one SAE: per-class shared, gained and lost latents",
        description="Compares two `patchsae analyze` outputs of the same SAE over the same "
        "images, one per model (the adapted one made with --pretrained). With --data, also "
        "both models' zero-shot accuracy and cross-model class top-k masking on that split.",
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--base", required=True, help="analysis with the base CLIP (analyze --out)")
    p.add_argument(
        "--adapted", required=True, help="analysis with the adapted weights (analyze --pretrained)"
    )
    p.add_argument("--top", type=int, default=10, help="latents per class under each model")
    p.add_argument("--data", default=None, help="an evaluation split for accuracy and masking")
    p.add_argument("--k", nargs="+", default=None, help="k values of the cross-model masking")
    p.add_argument("--templates", default="auto", help="openai, demo, auto or a file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/compare)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the SAE's MLflow run")
    p.set_defaults(func=_compare)


def _add_explore(sub: Any) -> None:
    p = sub.add_parser(
        "explore",
        help="a local web app: an image's top latents, their masks and reference images",
        description="Serves a Gradio app on HOST:PORT (default 127.0.0.1:7860). Upload or pick "
        "an image, pick one of its top latents to see its mask, statistics and reference images, "
        "click the mask for a patch's own top latents. With --adapted, the base and the adapted "
        "model side by side.",
    )
    p.add_argument("run_dir", help="a run folder with sae.safetensors + cfg.json")
    p.add_argument("--analysis", default=None, help="patchsae analyze output (RUN_DIR/analysis)")
    p.add_argument("--adapted", default=None, help="other weights of the same CLIP to compare")
    p.add_argument("--top", type=int, default=10, help="top latents listed per image")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this host)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_explore)


def _add_sync_mlflow(sub: Any) -> None:
    p = sub.add_parser("sync-mlflow", help="send MLflow records left unsent by an outage")
    p.add_argument("run_dir")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_sync_mlflow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_cache(sub)
    _add_make_demo_data(sub)
    _add_make_demo_clip(sub)
    _add_analyze(sub)
    _add_masks(sub)
    _add_report(sub)
    _add_eval_zeroshot(sub)
    _add_eval_masking(sub)
    _add_compare(sub)
    _add_explore(sub)
    _add_sync_mlflow(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        logging.getLogger("patchsae").debug("user error", exc_info=True)
        print(f"patchsae: error: {err}", file=sys.stderr)
        from patchsae.trainer.loop import TrainingDiverged

        return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else 2


def run(argv: list[str] | None = None) -> None:
    """The console script and ``python -m`` entry: ``main``, then the exit. A process that used a
    process group (torchrun, DeepSpeed) leaves without finalising the interpreter, where gloo's
    threads can abort it (see ``trainer.distributed.exit_process``)."""
    code = main(argv)
    from patchsae.trainer.distributed import exit_process, used_process_group

    if used_process_group():
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
