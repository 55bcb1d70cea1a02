"""Shared test setup: offline, CPU, Triton in its interpreter, small generated data."""

from __future__ import annotations

import os
import random
import shutil

# Before anything imports triton, open_clip or mlflow.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def seed() -> int:
    """A fresh torch seed per test, printed (pytest shows it when the test fails)."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"torch seed: {value}")
    return value


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory):
    """A small generated demo dataset (240 images of 64 px in 6 shards), shared by tests that
    only read it."""
    from patchsae.data.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, n_images=240, image_size=64, images_per_shard=40, seed=1)
    return out


@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory: pytest.TempPathFactory):
    """The demo CLIP trained as `make train` trains it (the Makefile's data sizes and seeds), once
    per session: ``(weights file, training record)``."""
    from patchsae.data.demo import make_demo_data
    from patchsae.data.demo_clip import WEIGHTS, train_demo_clip

    root = tmp_path_factory.mktemp("demo-clip")
    attributes = make_demo_data(root / "clip-data", n_images=4000, seed=1, split="attributes")
    heldout = make_demo_data(root / "heldout", n_images=400, seed=2)
    record = train_demo_clip(attributes, root / "clip", heldout=heldout)
    return root / "clip" / WEIGHTS, record


@pytest.fixture(scope="session")
def demo_adapted_clip(tmp_path_factory: pytest.TempPathFactory, demo_clip):
    """The adapted demo CLIP as `make train` makes it: the demo CLIP fine-tuned on 1,000
    sketches; ``(weights file, training record, sketch split, held-out sketch split)``."""
    from patchsae.data.demo import make_demo_data
    from patchsae.data.demo_clip import FINETUNE, WEIGHTS, train_demo_clip

    root = tmp_path_factory.mktemp("demo-adapted")
    sketch = make_demo_data(root / "sketch", n_images=1000, seed=3, style="sketch")
    heldout = make_demo_data(root / "sketch-heldout", n_images=400, seed=4, style="sketch")
    record = train_demo_clip(
        sketch, root / "clip", heldout=heldout, cfg=FINETUNE, init=demo_clip[0]
    )
    return root / "clip" / WEIGHTS, record, sketch, heldout


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    """Headless Debian chromium through Selenium (nothing downloaded). Skipped without it,
    except where ``PATCHSAE_REQUIRE_BROWSER=1`` (CI) makes that a failure."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        reason = f"{missing} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("PATCHSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PATCHSAE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path):
    """Where a test keeps what a person should be able to look at afterwards (screenshots):
    ``$PATCHSAE_TEST_ARTIFACTS`` when set (CI), else the test's tmp_path."""
    from pathlib import Path

    folder = Path(os.environ.get("PATCHSAE_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
