"""Checkpoints are verified against their manifest before a resume; a damaged newest one is
skipped for the previous one, and a full disk stops the run cleanly, resumable."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from patchsae.trainer import checkpoint
from patchsae.trainer.tracking import (
    UNSENT_FILE,
    Tracker,
    read_metrics,
    read_run_info,
    sync_unsent,
)
from safetensors.torch import load_file

from tests.helpers import free_port, run_cli, run_train, small_overrides, train_cmd


def flip_bytes(path, offset: int = 4096, n: int = 256) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shards):
    """8 steps with checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_train(small_overrides(demo_shards, out))
    return out


def test_every_checkpoint_file_is_in_the_manifest(trained):
    ckpt = trained / "checkpoints" / "step_00000008"
    listed = set(checkpoint.digest_files(ckpt))
    assert {"state.pt", "sae.safetensors", "cfg.json", "stream_rank0.pt"} <= listed
    assert checkpoint.verify(ckpt) == []
    # Shares of two ranks cover every file once.
    halves = [checkpoint.digest_files(ckpt, r, 2) for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == listed


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, trained, demo_shards):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    flip_bytes(out / "checkpoints" / "step_00000008" / "state.pt")
    sets = small_overrides(demo_shards, out) + ["train.total_tokens=12288"]
    proc = run_cli(train_cmd(sets, resume=True), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_00000008 is damaged" in proc.stderr
    assert "state.pt does not match its checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004 at step 4" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [*range(1, 9), *range(5, 13)]  # 5-8 trained again
    assert all(math.isfinite(r["metrics"]["loss/total"]) for r in records)
    assert checkpoint.verify(out / "checkpoints" / "step_00000012") == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_a_damaged_only_checkpoint_is_refused_naming_what_was_found(
    tmp_path, trained, demo_shards, damage
):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    ckpt = out / "checkpoints" / "step_00000008"
    if damage == "flip":
        flip_bytes(ckpt / "sae.safetensors")
        want = "sae.safetensors does not match its checksum"
    elif damage == "truncate":
        os.truncate(ckpt / "stream_rank0.pt", 1000)
        want = "stream_rank0.pt has 1000 bytes"
    elif damage == "delete":
        (ckpt / "state.pt").unlink()
        want = "state.pt is missing"
    else:
        (ckpt / "manifest.json").unlink()
        want = "manifest.json is missing, so the checkpoint is incomplete"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    proc = run_cli(train_cmd(small_overrides(demo_shards, out), resume=True), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no intact checkpoint" in proc.stderr and want in proc.stderr
    assert str(ckpt) in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before  # left as found


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"patchsae-{uuid.uuid4().hex[:6]}", path],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        if os.environ.get("PATCHSAE_REQUIRE_TMPFS") == "1":
            pytest.fail(f"cannot mount a tmpfs in CI: {proc.stderr}")
        pytest.skip(f"needs root to mount a small tmpfs: {proc.stderr.strip()}")


def test_a_full_disk_stops_with_one_line_and_resumes_once_space_is_freed(tmp_path, demo_shards):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "7m")  # one checkpoint (about 4.9 MB) fits, the second does not
    try:
        out = disk / "run"
        # The MLflow store lives off the small disk here; the run's files are what is tested.
        sets = small_overrides(demo_shards, out) + [
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"
        ]
        proc = run_cli(train_cmd(sets), timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert errors == [proc.stderr.strip().splitlines()[-1]], errors
        assert errors[0].startswith(
            "patchsae: error: no space left on device while writing checkpoint step_00000008 "
            f"to {out}/checkpoints/step_00000008.tmp"
        )
        assert "--resume" in errors[0] and "Traceback" not in proc.stderr
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
            "latest",
            "step_00000004",
        ]
        assert checkpoint.verify(out / "checkpoints" / "step_00000004") == []

        subprocess.run(["mount", "-o", "remount,size=24m", disk], check=True)
        resumed = run_cli(train_cmd(sets, resume=True), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [s for s, _ in read_metrics(out)["loss/total"]][-4:] == [5, 6, 7, 8]
        for name, tensor in load_file(out / "sae.safetensors").items():
            assert torch.isfinite(tensor).all(), name
    finally:
        subprocess.run(["umount", "-l", disk], capture_output=True)


def test_tracker_on_a_full_disk_keeps_whole_lines_and_saves_unsent_records_elsewhere(
    tmp_path, caplog
):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64k")
    try:
        run_dir = disk / "run"
        tracker = Tracker(
            run_dir,
            enabled=True,
            tracking_uri=f"http://127.0.0.1:{free_port()}",  # nothing listens: nothing is sent
            experiment="x",
            run_name="full",
            flush_timeout_s=0.5,
        )
        tracker.log_metrics({"loss/total": 1.0}, step=1)
        filler = disk / "filler"
        with pytest.raises(OSError), open(filler, "wb") as fh:
            fh.write(b"\0" * (1 << 20))  # fills the disk to the last byte
        with pytest.raises(checkpoint.DiskFullError, match=r"metrics log metrics.jsonl"):
            for step in range(2, 200):
                tracker.log_metrics({f"m/{i}": float(i) for i in range(50)}, step=step)
        with caplog.at_level(logging.WARNING, logger="patchsae.trainer.tracking"):
            tracker.close()
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
        messages = [r.getMessage() for r in caplog.records]
        saved = [m for m in messages if "saved" in m and "unsent MLflow records to" in m]
        assert any(f"could not save unsent MLflow records to {run_dir}" in m for m in messages)
        assert not (run_dir / UNSENT_FILE).exists()  # no partial file left
        assert len(saved) == 1 and tempfile.gettempdir() in saved[0], caplog.text
        assert "move it to" in saved[0] and "patchsae sync-mlflow" in saved[0]
        fallback = Path(saved[0].split(" to ")[1].split(" (")[0])
        assert json.loads(fallback.read_text())["end"]["status"] == "FINISHED"

        # Once there is space again, the user's two steps put every record and the status in
        # MLflow.
        filler.unlink()
        shutil.move(fallback, run_dir / UNSENT_FILE)
        store = f"sqlite:///{tmp_path}/mlflow.db"
        values = sum(len(json.loads(line)["metrics"]) for line in lines)
        assert sync_unsent(run_dir, tracking_uri=store) == values
        client = MlflowClient(store)
        run_id = read_run_info(run_dir)["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        history = client.get_metric_history(run_id, "m/49")
        assert sorted(m.step for m in history) == list(range(2, len(lines) + 1))
        assert not (run_dir / UNSENT_FILE).exists()
    finally:
        subprocess.run(["umount", "-l", disk], capture_output=True)
