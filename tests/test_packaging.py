"""What `pip install` puts into site-packages: one import package, `patchsae`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_wheel_holds_only_the_patchsae_package(tmp_path):
    # Built from a copy of the tracked files: setuptools writes build/ into the source folder.
    src = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("patchsae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"patchsae", next(t for t in top if t.endswith(".dist-info"))}, top
    packages = {name.split("/")[1] for name in names if name.startswith("patchsae/")}
    assert packages == {"data", "kernels", "trainer", "launchers", "analysis"}, packages
    assert "patchsae/data/model_configs/patchsae-demo-vit.json" in names
    assert "patchsae/launchers/train.py" in names
    assert not any(n.endswith((".so", ".o", ".pyc")) for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert "patchsae = patchsae.launchers.cli:run" in entry.decode()


def test_no_build_outputs_are_tracked():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [f for f in tracked if f.endswith((".so", ".o", ".pyc", ".whl", ".ninja_deps"))]
    assert not [f for f in tracked if f.startswith(".cache/")]
