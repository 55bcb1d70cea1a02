"""A separate venv with SAELens, for the interop test (``tests/test_saelens.py``).

SAELens pulls transformer-lens, transformers, datasets and wandb (about 1.9 GB), so it stays out
of the project's own environment: it is built once into a cache folder and the test runs a
loader script with its python. ``python -m tests.saelens_venv`` builds it (CI does that before
``make test``) and prints its path.

Run its python with ``-I`` and outside the repository: this repository's top-level ``kernels/``
folder would otherwise shadow Hugging Face's ``kernels`` package, which transformers probes
on import (``import sae_lens`` then fails with "Could not import module 'BertForPreTraining'").

The folder is ``$PATCHSAE_SAELENS_VENV``, or ``~/.cache/patchsae/saelens-<version>``. It is built
in a temp folder beside it and renamed into place after a check import, so an interrupted build
is never taken as ready.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SAELENS_VERSION = "6.54.12"
# The CPU-only wheel: SAELens needs no torchvision, and this one is on the machines' disk.
REQUIREMENTS = ("torch==2.13.0", f"sae-lens=={SAELENS_VERSION}")
READY = ".patchsae-ready"


def venv_dir() -> Path:
    override = os.environ.get("PATCHSAE_SAELENS_VENV")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "patchsae" / f"saelens-{SAELENS_VERSION}"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path | None = None) -> bool:
    venv = venv_dir() if venv is None else venv
    return (venv / READY).is_file() and python_of(venv).exists()


def build(venv: Path | None = None) -> Path:
    """Build the venv unless it is ready; return its folder. Raises ``RuntimeError`` (with pip's
    output) when the build fails."""
    venv = venv_dir() if venv is None else venv
    if is_ready(venv):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    for stale in venv.parent.glob(f".{venv.name}.tmp*"):  # left by a build that was killed
        pid = stale.name.rpartition(".tmp")[2]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = venv.with_name(f".{venv.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # After the rename, bin/pip and bin/activate still name the temp folder; that is fine
        # because only `bin/python -m ...` is used, which finds its packages next to itself.
        _run([sys.executable, "-m", "venv", str(tmp)], venv.parent)
        pip = [str(python_of(tmp)), "-m", "pip", "install", "--quiet"]
        _run([*pip, "--disable-pip-version-check", *REQUIREMENTS], venv.parent)
        _run([str(python_of(tmp)), "-I", "-c", "import sae_lens, torch"], venv.parent)
        (tmp / READY).write_text(" ".join(REQUIREMENTS) + "\n")
        shutil.rmtree(venv, ignore_errors=True)  # one without the marker: not ours, or broken
        os.replace(tmp, venv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return venv


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the SAELens venv failed: {' '.join(cmd)} exited {proc.returncode}\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


if __name__ == "__main__":
    start = time.perf_counter()
    ready = is_ready()
    path = build()
    took = "already built" if ready else f"built in {time.perf_counter() - start:.0f} s"
    print(f"{path} ({took})")
