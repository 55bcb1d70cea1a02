"""The ``patchsae`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: printed without a trace."""
    from patchsae.data.activations import ModelError
    from patchsae.data.shards import ShardError
    from patchsae.trainer.checkpoint import CheckpointError, DiskFullError
    from patchsae.trainer.config import ConfigError
    from patchsae.trainer.loop import TrainingDiverged
    from patchsae.trainer.tracking import SyncError

    return (
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


def _train(args: argparse.Namespace) -> int:
    from patchsae.trainer.config import load_config
    from patchsae.trainer.loop import train

    cfg = load_config(args.config, args.set)  # validated before any data is read
    summary = train(cfg, resume=args.resume)
    return 0 if summary["step"] > 0 else 1


def _make_demo_data(args: argparse.Namespace) -> int:
    from patchsae.data.demo import make_demo_data

    out = make_demo_data(args.out, n_images=args.n_images, seed=args.seed, split=args.split)
    print(f"demo shards written to {out}")
    return 0


def _make_demo_clip(args: argparse.Namespace) -> int:
    from patchsae.data.demo_clip import DemoClipConfig, train_demo_clip

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("patchsae").setLevel(logging.INFO)  # progress, without open_clip's chatter
    cfg = DemoClipConfig(seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    record = train_demo_clip(args.data, args.out, heldout=args.heldout, cfg=cfg)
    accuracy = record.get("zeroshot_accuracy")
    print(
        f"demo CLIP written to {args.out} in {record['train_seconds']:.0f} s"
        + (
            f"; zero-shot accuracy on {args.heldout}: {accuracy:.1%}"
            if accuracy is not None
            else ""
        )
    )
    return 0


def _sync_mlflow(args: argparse.Namespace) -> int:
    from patchsae.trainer.tracking import sync_unsent

    sent = sync_unsent(Path(args.run_dir), tracking_uri=args.tracking_uri)
    print(f"sent {sent} records from {args.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=_make_demo_data)

    p = sub.add_parser(
        "make-demo-clip", help="train the demo CLIP on captioned demo images (make-demo-data)"
    )
    p.add_argument("--data", required=True, help="shards of the attributes split (captioned)")
    p.add_argument("--out", required=True, help="output folder (demo_clip.safetensors)")
    p.add_argument("--heldout", default=None, help="a classes split to report zero-shot accuracy")
    p.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default: DemoClipConfig.steps)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_demo_clip)

    p = sub.add_parser("sync-mlflow", help="send MLflow records left unsent by an outage")
    p.add_argument("run_dir")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_sync_mlflow)
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
