"""Helpers shared by tests: the real CLI in a subprocess, and how far a tensor is from another."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (float64; the shapes must agree)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def jumprelu_thresholds(inputs: dict[str, torch.Tensor], quantile: float) -> torch.Tensor:
    """For the kernel tests' grid-valued inputs (pre-activations on multiples of 1/2048):
    positive per-latent thresholds near each latent's ``quantile`` of its pre-activations, half
    a grid step off the grid, so that no pre-activation equals one and none sits within
    rounding of a window's edge (bandwidth 0.3)."""
    x, W_enc, b_enc, b_dec = (inputs[k].double() for k in ("x", "W_enc", "b_enc", "b_dec"))
    pre = (x - b_dec) @ W_enc + b_enc
    cut_F = torch.round(pre.quantile(quantile, dim=0) * 2048) / 2048
    return (cut_F.clamp_min(1 / 256) + 1 / 4096).to(inputs["x"].dtype)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def small_overrides(shards: Path, out_dir: Path, **extra: object) -> list[str]:
    """A short demo run on the session's small shards: 8 steps of 1,024 tokens."""
    values: dict[str, object] = {
        "model.pretrained": None,  # random CLIP weights: these runs test the machinery
        "data.urls": shards,
        "data.num_workers": 1,
        "data.images_per_batch": 16,
        "data.mix_buffer_tokens": 4096,
        "sae.expansion": 8,  # 128 -> 1,024 latents, narrower than the demo recipe's
        "sae.init_sample_tokens": 1024,
        "train.batch_tokens": 1024,
        "train.total_tokens": 8 * 1024,
        "train.total_images": None,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.dead_window_tokens": 4096,
        "train.out_dir": out_dir,
        "train.threads": 1,
        "eval.every": 0,  # the demo recipe's zero-shot evaluation reads runs/demo-heldout
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def python_cmd(nproc: int = 1) -> list[str]:
    """The interpreter, under ``torchrun --standalone`` with ``nproc`` ranks (gloo on CPU) when
    ``nproc`` > 1; append ``-m module`` or a script and its arguments."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc)]  # fmt: skip


def train_cmd(
    overrides: list[str], *, config: Path = DEMO, resume: bool | str = False, nproc: int = 1
) -> list[str]:
    """``resume``: False (fresh), True (``--resume``) or a value (``--resume VALUE``)."""
    cmd = [*python_cmd(nproc), "-m", "patchsae.launchers.train", "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    if resume is True:
        cmd.append("--resume")
    elif resume:
        cmd += ["--resume", str(resume)]
    return cmd


def run_cli(
    cmd: list[str], *, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root with the tests' environment, output captured as text."""
    return subprocess.run(
        cmd, cwd=ROOT, env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def start_train(
    overrides: list[str], *, env: dict[str, str] | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Training in the background (stdout discarded, stderr captured as text)."""
    return subprocess.Popen(
        train_cmd(overrides),
        cwd=ROOT,
        env=cli_env(**(env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def run_train(
    overrides: list[str], *, timeout: float = 600, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    proc = run_cli(train_cmd(overrides, **kwargs), timeout=timeout, env=env)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def wait_until(predicate, timeout: float, what: str):
    """``predicate()``'s first truthy value, polled every 0.5 s; exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - e.g. a page still loading
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def save_other_architecture_clip(path: Path) -> None:
    """A CLIP checkpoint like the demo CLIP's but 64 wide instead of 128: weights of another
    architecture, for tests of the checks that refuse them."""
    import open_clip
    from patchsae.data.activations import DEMO_MODEL, register_models
    from safetensors.torch import save_file

    register_models()
    cfg = open_clip.get_model_config(DEMO_MODEL)
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "width": 64}
    state = open_clip.model.CLIP(**cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
