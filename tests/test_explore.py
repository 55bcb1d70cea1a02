"""The explorer app as a person uses it: started on a free port, driven in headless chromium.

Upload an image, read the top latents, pick one, see its masks (base and adapted), click a
patch, read that patch's top latents; every shown value is checked against :class:`Explorer`
computed here, and a screenshot is kept.
"""

from __future__ import annotations

import io
import subprocess
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch
from patchsae.analysis.explore import Explorer
from patchsae.analysis.model import AnalysisError
from patchsae.data.shards import decode_image, expand_urls, iter_samples

from tests.helpers import (
    ROOT,
    cli_env,
    free_port,
    python_cmd,
    run_cli,
    save_other_architecture_clip,
    wait_until,
)
from tests.test_adaptation import EVALUATE, analyses  # noqa: F401 - the fixture


@pytest.fixture
def image_file(demo_shards, tmp_path):
    """A held-out demo image (not among the analysed ones) as a PNG file."""
    url = expand_urls(f"{demo_shards}/{EVALUATE}")[0]
    sample = next(iter(iter_samples(url)))
    path = tmp_path / "upload.png"
    decode_image(sample).save(path)
    return path


@pytest.fixture
def app(analyses):  # noqa: F811
    run, base_dir, _, adapted = analyses
    port = free_port()
    cmd = [*python_cmd(1), "-m", "patchsae.launchers.cli", "explore", str(run), "--analysis",
           str(base_dir), "--adapted", str(adapted), "--port", str(port), "--top", "6"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(GRADIO_ANALYTICS_ENABLED="False"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200 or proc.poll(),
                   180, "the explorer to serve")  # fmt: skip
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(PIL.Image.open(io.BytesIO(response.read())).convert("RGB"))


def _mask_src(browser, model: str) -> str | None:
    from selenium.webdriver.common.by import By

    images = browser.find_elements(By.CSS_SELECTOR, f"#mask-{model} img")
    return images[0].get_attribute("src") if images else None


def test_explorer_shows_top_latents_masks_and_patches(
    app,
    analyses,  # noqa: F811
    image_file,
    browser,
    artifacts,
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    run, base_dir, _, adapted = analyses
    expected = Explorer(run, analysis=base_dir, adapted=str(adapted), top=6, n_examples=0)
    image = PIL.Image.open(image_file).convert("RGB")
    view = expected.inspect(image)
    choices = expected.latent_choices(view)
    assert choices, "the test image activates no latent"

    browser.set_window_size(1400, 1400)
    browser.get(app)
    upload = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, "#image input[type=file]"), 60, "the page"
    )
    upload.send_keys(str(image_file))

    # The image's top latents, grouped shared / base-only / adapted-only, as the Explorer has them.
    def radio_labels():
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#latents label")]

    wait_until(lambda: radio_labels() == [label for label, _ in choices], 60, "the top latents")
    groups = browser.find_element(By.ID, "groups").text
    for group, latents in expected.groups(view).items():
        assert f"{group} ({len(latents)})" in groups
    plot = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, "#activation-plot img").get_attribute("src"),
        30,
        "the activation plot",
    )
    assert _png(plot).shape[1] > 500

    # Pick the last latent of the list: both masks are exactly the Explorer's.
    label, latent = choices[-1]
    before = _mask_src(browser, "base")
    browser.find_elements(By.CSS_SELECTOR, "#latents label")[-1].click()
    wait_until(lambda: _mask_src(browser, "base") not in (None, before), 60, "the new mask")
    wait_until(lambda: f"Latent {latent}" in browser.find_element(By.ID, "latent-stats").text,
               30, "the latent's statistics")  # fmt: skip
    want = expected.masks(view, latent)
    for model in ("base", "adapted"):
        shown = wait_until(lambda m=model: _mask_src(browser, m), 30, f"the {model} mask")
        np.testing.assert_array_equal(_png(shown), np.asarray(want[model]))
    refs = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#references img"), 60, "references"
    )
    assert len(refs) == len(expected.references(latent))

    # Click the patch at row 2, column 5 of the 8 x 8 grid on the base mask.
    mask = browser.find_element(By.CSS_SELECTOR, "#mask-base img")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", mask)
    box = mask.rect
    row, col = 2, 5
    dx = (col + 0.5) / 8 * box["width"] - box["width"] / 2
    dy = (row + 0.5) / 8 * box["height"] - box["height"] / 2
    ActionChains(browser).move_to_element_with_offset(mask, int(dx), int(dy)).click().perform()
    patch = row * 8 + col
    _check_outline(
        expected.mask(view, "base", latent, patch=patch), expected.mask(view, "base", latent),
        row, col,
    )  # fmt: skip
    wait_until(lambda: f"Patch {patch} " in browser.find_element(By.ID, "patch-label").text,
               30, "the patch's latents")  # fmt: skip
    table = expected.patch_top(view, patch)
    want_rows = [[m, str(k), str(j)] for m, k, j in
                 zip(table.model, table["rank"], table.latent, strict=True)]  # fmt: skip

    def shown_rows():  # the table's text, one cell per line after its 5 headers
        lines = browser.find_element(By.ID, "patch-latents").text.split("\n")
        cells = lines[lines.index("top class") + 1 :]
        return [cells[i : i + 3] for i in range(0, len(cells), 5)]

    wait_until(lambda: shown_rows() == want_rows, 30, f"the rows {want_rows}")
    # The masks now outline that patch.
    outlined = expected.masks(view, latent, patch)
    for model in ("base", "adapted"):
        wait_until(
            lambda m=model: np.array_equal(_png(_mask_src(browser, m)), np.asarray(outlined[m])),
            30,
            f"the {model} mask with patch {patch} outlined",
        )
    assert not np.array_equal(np.asarray(outlined["base"]), np.asarray(want["base"]))

    browser.execute_script("window.scrollTo(0, 0)")
    shot = browser.get_screenshot_as_png()
    (artifacts / "explore.png").write_bytes(shot)
    # The screenshot shows the masks' colour map, not a blank page.
    rgb = np.asarray(PIL.Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean() > 0.01


def _check_outline(outlined: PIL.Image.Image, plain: PIL.Image.Image, row: int, col: int) -> None:
    """The outline changes only the border of that patch's 32 x 32 block of the 256 px mask,
    and that whole border is cyan."""
    a, b = np.asarray(outlined).astype(int), np.asarray(plain).astype(int)
    ys, xs = np.nonzero((a != b).any(axis=2))
    assert ys.min() >= 32 * row and ys.max() <= 32 * row + 31
    assert xs.min() >= 32 * col and xs.max() <= 32 * col + 31
    border = a[32 * row, 32 * col : 32 * col + 32]
    assert (border == [0, 255, 255]).all()


def test_explorer_refuses_bad_input_before_serving(analyses, tmp_path):  # noqa: F811
    run, base_dir, _, _ = analyses
    other = tmp_path / "other.safetensors"
    save_other_architecture_clip(other)
    cli = [*python_cmd(1), "-m", "patchsae.launchers.cli", "explore", str(run)]
    for extra, match in (
        (["--analysis", str(base_dir), "--adapted", str(other)], "is not a checkpoint of"),
        (["--analysis", str(tmp_path / "none")], "has no complete analysis"),
        (["--analysis", str(base_dir), "--top", "0"], "--top 0: must be >= 1"),
    ):
        proc = run_cli([*cli, *extra, "--port", str(free_port())], timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert match in proc.stderr and "Traceback" not in proc.stderr


def test_explorer_api_on_one_model(analyses, image_file):  # noqa: F811
    """Without --adapted: one model, every top latent listed; a patch is found from a click's
    pixel on the drawn mask; masks are the per-patch codes."""
    run, base_dir, _, _ = analyses
    explorer = Explorer(run, analysis=base_dir, top=5, n_examples=3)
    assert explorer.models == ("base",) and len(explorer.examples) == 3
    assert all(PIL.Image.open(p).size == (64, 64) for p in explorer.examples)
    view = explorer.inspect(PIL.Image.open(image_file))
    top = view.top("base", 5)
    assert [j for _, j in explorer.latent_choices(view)] == [j for j, _ in top]
    assert explorer.groups(view) == {"shared": [j for j, _ in top], "base-only": [],
                                     "adapted-only": []}  # fmt: skip
    codes = explorer.makers["base"].codes([PIL.Image.open(image_file)])[0]
    assert torch.allclose(view.mean_F["base"], codes.mean(0))
    j = top[0][0]
    assert torch.equal(explorer.grid(view, "base", j), codes[1:, j].reshape(8, 8))
    assert explorer.mask(view, "base", j).size == (256, 256)
    assert explorer.patch_at(view, 0, 0, (256, 256)) == 0
    assert explorer.patch_at(view, 255, 255, (256, 256)) == 63
    assert explorer.patch_at(view, 5 * 32 + 1, 2 * 32 + 1, (256, 256)) == 2 * 8 + 5
    table = explorer.patch_top(view, 10)
    want = codes[11].topk(5)
    assert table.latent.tolist() == [
        int(i) for i, v in zip(want.indices, want.values, strict=True) if v > 0
    ]
    with pytest.raises(AnalysisError, match="latent 5000 is out of range"):
        explorer.latent_stats(5000)
