"""Many SAEs in one pass: a recipe's ``sweep:`` list trains every member on the same tokens.

::

    sweep:
      - {sae.l1_coeff: 4.0e-5}
      - {sae.l1_coeff: 8.0e-5}
      - {name: wide, sae.expansion: 32}
      - {name: topk32, sae.architecture: topk, sae.k: 32, train.lr: 1.0e-3}

Each member overrides keys of ``config.SWEEP_KEYS`` (the SAE and its optimiser). One token
stream (one CLIP pass, or one cache read) and one token sample for the initialisation feed all
of them, so each member trains exactly as a run of its own config would on the same batches.

``train.out_dir`` holds the sweep: ``sweep.json`` (the members and their status), the comparison
once finished (``sweep.csv``, ``sweep.md``, ``pareto.png``: L0 against FVU) and the parent MLflow
run; each member is a complete run in ``out_dir/<name>`` (checkpoints, export, ``config.yaml``,
an MLflow run nested under the parent) that ``analyze`` and the rest take like any run. All
members checkpoint at the same steps (each checkpoint also holds the stream position, so a
member resumes on its own too), old checkpoints are pruned only once every member has saved,
and ``--resume`` continues every member from the newest step they all reached.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

from patchsae.trainer import checkpoint
from patchsae.trainer.checkpoint import CheckpointError, atomic_write
from patchsae.trainer.config import Config, check_model, member_configs
from patchsae.trainer.distributed import Distributed
from patchsae.trainer.inputs import build_stream, init_sample, needs_weights
from patchsae.trainer.loop import (
    Plan,
    Shared,
    StopRequest,
    Trainer,
    TrainingDiverged,
    drive,
    setup_process,
)
from patchsae.trainer.tracking import NullTracker, Tracker, read_run_info, resolve_tracking_uri

log = logging.getLogger(__name__)

STATE = "sweep.json"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
COLUMNS = ("quality/fvu", "sparsity/l0", "sparsity/dead_frac", "sparsity/dense_frac", "loss/total")


def _members(cfg: Config, uri: str | None) -> list[tuple[str, Config]]:
    """The members' configs, logging to the sweep's MLflow store (system metrics: the parent's)."""
    out = []
    for name, member in member_configs(cfg):
        tracking = dataclasses.replace(
            member.tracking, tracking_uri=uri, system_metrics_every_s=0.0
        )
        out.append((name, dataclasses.replace(member, tracking=tracking)))
    return out


def _resume_step(root: Path, members: list[tuple[str, Config]], resume: str | None) -> int | None:
    """The step every member resumes from (None: a fresh start); checks the folder first."""
    state = _read_state(root)
    if resume is None:
        if state is not None:
            raise CheckpointError(
                f"train.out_dir {root} already holds a sweep; pass --resume to continue it, or "
                "set another train.out_dir (or delete that folder) to start a new one"
            )
        return None
    if resume not in ("auto", "if-present"):
        raise CheckpointError(
            f"--resume {resume}: a sweep resumes from its own folder only; pass --resume "
            "without a value (or if-present)"
        )
    if state is None:
        if resume == "if-present":
            return None
        raise CheckpointError(f"--resume: {root} holds no sweep ({STATE} is missing)")
    names = [name for name, _ in members]
    if [m["name"] for m in state["members"]] != names:
        raise CheckpointError(
            f"--resume: the sweep in {root} has the members {[m['name'] for m in state['members']]}"
            f" but the recipe lists {names}; resume with the same sweep list"
        )
    newest = {}
    for name, member in members:
        found = checkpoint.candidates(Path(member.train.out_dir))
        newest[name] = int(found[0].name.split("_")[-1]) if found else None
    if all(step is None for step in newest.values()):
        if resume == "if-present":
            return None
        raise CheckpointError(f"--resume: the sweep in {root} has no checkpoint yet; start anew")
    missing = [name for name, step in newest.items() if step is None]
    if missing:
        raise CheckpointError(
            f"--resume: members {missing} of the sweep in {root} have no checkpoint while others "
            "do (the sweep stopped while writing its first one); delete the members' "
            "checkpoints folders to start the sweep over"
        )
    step = min(s for s in newest.values() if s is not None)
    for name, member in members:
        if not checkpoint.step_dir(Path(member.train.out_dir), step).is_dir():
            raise CheckpointError(
                f"--resume: member {name} has no checkpoint of step {step}, the newest step "
                "every member reached; restore it, or start the sweep over in a new folder"
            )
    return step


def _read_state(root: Path) -> dict[str, Any] | None:
    path = root / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(root: Path, cfg: Config, members: list[tuple[str, Config]], **extra: Any) -> None:
    state = {
        "members": [
            {"name": name, "dir": name, "overrides": {k: v for k, v in e.items() if k != "name"}}
            for (name, _), e in zip(members, cfg.sweep, strict=True)
        ],
        **extra,
    }
    atomic_write(root / STATE, lambda p: p.write_text(json.dumps(state, indent=1)), STATE)


class _Parent:
    """The parent MLflow run (main rank): the sweep's params, then its comparison; each member's
    run is tagged with its id once the parent exists on the server (at once, or after an
    outage at a later log step)."""

    def __init__(self, cfg: Config, root: Path, uri: str | None, is_main: bool) -> None:
        t = cfg.tracking
        self.tracker: Tracker | NullTracker = NullTracker()
        if is_main:
            self.tracker = Tracker(
                root,
                enabled=t.enabled,
                tracking_uri=uri,
                experiment=t.experiment,
                run_name=t.run_name or root.resolve().name,
                run_id=(read_run_info(root) or {}).get("run_id"),
                flush_timeout_s=t.flush_timeout_s,
                system_metrics_every_s=t.system_metrics_every_s,
            )
        self.tagged: set[int] = set()

    def tag(self, trainers: list[Trainer]) -> None:
        run_id = getattr(self.tracker, "run_id", None)
        if not run_id:
            return
        for t in trainers:
            if id(t) not in self.tagged:
                t.tracker.set_tags({PARENT_TAG: run_id})
                self.tagged.add(id(t))


def train_sweep(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train the recipe's sweep (see the module docstring); returns each member's summary."""
    stop = StopRequest()  # first, so that a stop signal during start-up is not lost
    dist = Distributed.from_env(cfg.distributed, cfg.train.device)
    setup_process(cfg, dist)
    root = Path(cfg.train.out_dir)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, root) if cfg.tracking.enabled else None
    members = _members(cfg, uri)
    step = _resume_step(root, members, resume)
    dist.barrier()  # every rank has read the folder before the main rank writes into it
    root.mkdir(parents=True, exist_ok=True)
    layer = check_model(cfg.model, weights=needs_weights(cfg))
    stream = build_stream(cfg, dist, layer)
    plan = Plan.make(cfg, stream.tokens_per_image, dist.world_size)
    sample = init_sample(stream, cfg) if step is None else None
    shared = Shared(stop, dist, stream, plan, sample)
    parent = _Parent(cfg, root, uri, dist.is_main)
    if dist.is_main and step is None:
        _write_state(root, cfg, members, status="running")
        parent.tracker.log_params(cfg.flat() | _member_params(members, cfg))
        parent.tracker.flush(10.0)  # the parent's id, so the members are tagged from the start
    trainers = []
    for name, member in members:
        where = checkpoint.step_dir(Path(member.train.out_dir), step) if step is not None else None
        trainers.append(Trainer(member, str(where) if where else None, shared=shared))
        trainers[-1].keep_checkpoints = None  # pruned below, once every member has saved
        log.info("sweep member %s: %s", name, member.train.out_dir)
    parent.tag(trainers)

    def after_save(saved: list[Trainer]) -> None:
        parent.tag(trainers)
        if dist.is_main:
            for t in saved:
                checkpoint.prune(t.run_dir, cfg.train.keep_checkpoints)

    status = "FAILED"
    try:
        summaries = drive(trainers, after_save=after_save)
        interrupted = summaries[0]["interrupted"]
        status = "RUNNING" if interrupted else "FINISHED"
        if dist.is_main and not interrupted:
            _compare(root, members, summaries, parent.tracker)
            _write_state(root, cfg, members, status="finished")
    finally:
        parent.tag(trainers)
        parent.tracker.close(status=status)
    names = [name for name, _ in members]
    diverged = [
        f"{n}: {s['diverged']}" for n, s in zip(names, summaries, strict=True) if s["diverged"]
    ]
    if diverged:
        raise TrainingDiverged(
            f"{len(diverged)} of the sweep's {len(names)} SAEs stopped on non-finite steps (the "
            f"others finished; the comparison in {root} lists all): " + " | ".join(diverged)
        )
    return {
        "step": max(s["step"] for s in summaries),
        "interrupted": interrupted,
        "members": dict(zip(names, summaries, strict=True)),
    }


def _member_params(members: list[tuple[str, Config]], cfg: Config) -> dict[str, Any]:
    params: dict[str, Any] = {"sweep/members": ",".join(name for name, _ in members)}
    for (name, _), entry in zip(members, cfg.sweep, strict=True):
        params[f"sweep/{name}"] = json.dumps({k: v for k, v in entry.items() if k != "name"})
    return params


def _compare(
    root: Path,
    members: list[tuple[str, Config]],
    summaries: list[dict[str, Any]],
    tracker: Tracker | NullTracker,
) -> None:
    """The comparison of the finished members: a table (CSV and Markdown) and the L0-FVU plot,
    written to the sweep folder and logged to the parent run."""
    rows = []
    for (name, member), summary in zip(members, summaries, strict=True):
        m = summary["metrics"]
        rows.append(
            {
                "name": name,
                "status": "diverged" if summary["diverged"] else "finished",
                "architecture": member.sae.architecture,
                "n_latents": member.sae.n_latents or f"x{member.sae.expansion}",
                "l1_coeff": member.sae.l1_coeff,
                "k": member.sae.k if member.sae.architecture in ("topk", "batchtopk") else "",
                "lr": member.train.lr,
                **{key: m.get(key, float("nan")) for key in COLUMNS},
            }
        )
    fields = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(root / "sweep.csv", lambda p: p.write_text(buf.getvalue()), "sweep.csv")
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(root / "sweep.md", lambda p: p.write_text("\n".join(lines) + "\n"), "sweep.md")
    from patchsae.trainer.plots import pareto_plot

    plot = pareto_plot(
        [r["name"] for r in rows],
        [float(r["sparsity/l0"]) for r in rows],
        [float(r["quality/fvu"]) for r in rows],
        root / "pareto.png",
    )
    for path in (root / "sweep.csv", root / "sweep.md", plot):
        tracker.log_artifact(path, "sweep")
    log.info("sweep comparison written to %s:\n%s", root / "sweep.md", "\n".join(lines))
