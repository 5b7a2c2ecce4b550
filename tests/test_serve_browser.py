"""The web page of `vitkit serve` in headless Chromium: upload an image, read the top-5 bars, check that the
attention overlay is painted.

Uses the system's chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`; `make test`
installs them where it can); nothing is downloaded. Skips, saying why, where they are missing.

VITKIT_SCREENSHOT=docs/serve.png also saves a screenshot of the page; VITKIT_SCREENSHOT_MODEL,
VITKIT_SCREENSHOT_IMAGE and VITKIT_SCREENSHOT_NAME then choose the model, the image and the name shown (default:
the test's tiny model and image).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from randomized import randomized
from serving import call, running_server

import vitkit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver; "
        "`make test` installs them where apt-get is available)",
        allow_module_level=True,
    )
pytest.importorskip("starlette", reason="the serve extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
# Share of the overlay's pixels that are painted, and how many distinct colours they have.
PAINTED = """
const c = document.getElementById("overlay");
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
let painted = 0;
const colours = new Set();
for (let i = 0; i < d.length; i += 4) {
  if (d[i + 3] > 0) { painted++; colours.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]); }
}
return [painted / (c.width * c.height), colours.size];
"""


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"]:
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def test_page_shows_top5_bars_and_the_attention_overlay(tmp_path):
    model_dir = os.environ.get("VITKIT_SCREENSHOT_MODEL")
    image = os.environ.get("VITKIT_SCREENSHOT_IMAGE")
    if model_dir is None:
        cfg = vitkit.ViTConfig(img_size=(32, 32), patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, num_classes=7)
        model = randomized(cfg, seed=5)
        model.classes = CLASSES
        model_dir = tmp_path / "model"
        vitkit.save_pretrained(model, model_dir)
    if image is None:
        gradient = np.linspace(0, 255, 160, dtype=np.uint8)
        pixels = np.stack(
            [np.tile(gradient, (120, 1)), np.tile(gradient[:120, None], (1, 160)), 255 - np.tile(gradient, (120, 1))],
            -1,
        )
        image = tmp_path / "photo.png"
        Image.fromarray(pixels).save(image)
    name = ["--name", os.environ["VITKIT_SCREENSHOT_NAME"]] if "VITKIT_SCREENSHOT_NAME" in os.environ else []
    with running_server(Path(model_dir), tmp_path / "server.log", *name) as url:
        status, expected = call(url + "/predict?topk=5", Path(image).read_bytes())
        assert status == 200
        driver = browser()
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 60).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
            upload = driver.find_element(By.ID, "file")
            driver.execute_script("arguments[0].hidden = false", upload)  # what a click on the drop zone opens
            upload.send_keys(str(Path(image).resolve()))
            driver.execute_script("arguments[0].hidden = true", upload)
            WebDriverWait(driver, 120).until(
                lambda d: (
                    d.find_element(By.ID, "overlay").get_attribute("data-drawn") == "1"
                    or d.find_element(By.ID, "error").is_displayed()
                )
            )
            assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
            labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .label")]
            percents = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .pct")]
            widths = [e.get_attribute("style") for e in driver.find_elements(By.CSS_SELECTOR, "#bars .fill")]
            assert labels == expected["labels"]
            assert percents == [f"{100 * p:.1f}%" for p in expected["probs"]]
            widths = [float(w.removeprefix("width: ").removesuffix("%;")) for w in widths]  # "12%" for 12.0%
            np.testing.assert_allclose(widths, [100 * p for p in expected["probs"]], atol=0.051)
            painted, colours = driver.execute_script(PAINTED)
            assert painted > 0.95 and colours > 4  # the whole image ("squash"), coloured by attention
            assert driver.find_element(By.ID, "view").size["width"] > 200  # the image itself is drawn
            if os.environ.get("VITKIT_SCREENSHOT"):
                Path(os.environ["VITKIT_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(os.environ["VITKIT_SCREENSHOT"])
        finally:
            driver.quit()
