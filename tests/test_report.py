"""The latent report in a real browser (Debian's chromium through Selenium): from the file and
from the MLflow UI's artifact view, with screenshots.

The ``browser`` fixture (conftest) skips without chromium and chromedriver, except where
``PATCHSAE_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import io
import time

import numpy as np
import PIL.Image
from patchsae.trainer.tracking import read_run_info

from tests.helpers import python_cmd, run_cli, wait_until
from tests.mlflow_server import MlflowServer
from tests.test_analysis import small_run  # noqa: F401 - the fixture


def _check_page(driver, n_latents: int, latent: int) -> None:
    """The table has every latent, every image decoded, the named latent has its section, and a
    click on a header sorts the table."""
    from selenium.webdriver.common.by import By

    rows = wait_until(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")) == n_latents,
        60,
        "the table",
    )
    assert rows
    images = driver.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 2
    loaded = wait_until(
        lambda: all(
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in images
        ),
        60,
        "the images",
    )
    assert loaded
    assert driver.find_elements(By.ID, f"latent-{latent}")
    header = driver.find_elements(By.CSS_SELECTOR, "#latents th")[1]  # frequency
    assert header.text == "frequency"
    header.click()
    header.click()  # descending
    values = driver.execute_script(
        "return Array.from(document.querySelectorAll('#latents tbody tr td:nth-child(2)'))"
        ".map(function (c) { return parseFloat(c.dataset.v); })"
    )
    assert len(values) == n_latents
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


def _scatter_is_drawn(png: bytes) -> None:
    """The screenshot shows the scatter: many coloured (not grey or white) pixels."""
    rgb = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 60).mean() > 0.005, (saturation > 60).mean()


def test_report_opens_from_the_file_and_from_the_mlflow_ui(
    small_run,  # noqa: F811
    demo_shards,
    tmp_path,
    browser,
    artifacts,
):
    from selenium.webdriver.common.by import By

    cli = [*python_cmd(1), "-m", "patchsae.launchers.cli"]
    proc = run_cli([*cli, "analyze", str(small_run), "--data", str(demo_shards)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli([*cli, "report", str(small_run), "--latents", "7"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = small_run / "analysis" / "report.html"
    assert report.is_file()
    assert PIL.Image.open(small_run / "analysis" / "scatter.png").size[0] > 300
    assert PIL.Image.open(small_run / "analysis" / "latents" / "latent_7.png").size[0] > 300

    browser.get(report.resolve().as_uri())
    _check_page(browser, 1024, 7)
    browser.execute_script("window.scrollTo(0, 0)")
    shot = browser.get_screenshot_as_png()
    (artifacts / "report-file.png").write_bytes(shot)
    _scatter_is_drawn(shot)

    # The same file from the run's page in the MLflow UI (artifacts analysis/report.html).
    info = read_run_info(small_run)
    with MlflowServer(tmp_path / "server", backend_store_uri=info["tracking_uri"]) as server:
        browser.get(
            f"{server.uri}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
            "/artifacts/analysis/report.html"
        )
        frame = wait_until(
            lambda: browser.find_element(By.TAG_NAME, "iframe"), 90, "the artifact view"
        )
        time.sleep(1)
        shot = browser.get_screenshot_as_png()
        (artifacts / "report-mlflow.png").write_bytes(shot)
        _scatter_is_drawn(shot)
        browser.switch_to.frame(frame)
        _check_page(browser, 1024, 7)
