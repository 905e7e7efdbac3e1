"""The web page and the reports in a real headless Chromium, end to end against a running
`modelshrink serve`: paste a key, upload a model and a dataset, submit a job and a search, watch
their progress arrive, open both reports and check that their plots render (elements with real
size, a screenshot that is not blank)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import free_port
from tests.builders import dataset_npz, mlp, save
from tests.conftest import ROOT
from tests.integration.test_serve import EXE, start, stop

pytestmark = pytest.mark.integration
WAIT_S = 240
# Where to keep the screenshots (the README's come from here): MODELSHRINK_SCREENSHOTS=docs/screenshots.
SCREENSHOTS = os.environ.get("MODELSHRINK_SCREENSHOTS")


def _browser_or_skip():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("MODELSHRINK_TEST_REQUIRE_SERVICES"):
            pytest.fail("chromium and chromedriver must be installed (scripts/ensure-browser.sh)")
        pytest.skip("chromium and chromedriver are not installed (scripts/ensure-browser.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, str]]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}, "MODELSHRINK_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    key = subprocess.run([EXE, "keys", "create", "--tenant", "ui"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    proc, url = start(env, free_port())
    try:
        yield url, key
    finally:
        stop(proc)


@pytest.fixture
def browser():
    driver = _browser_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


def _not_blank(png: bytes) -> int:
    """Distinct colours in the screenshot (a blank or failed render has one or two)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 20) or [])


def _shot(driver, name: str) -> bytes:
    png = driver.get_screenshot_as_png()
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SCREENSHOTS) / name).write_bytes(png)
    return png


def _rendered(driver, selector: str) -> list[dict]:
    """Inside the report frame: every element matching selector with its on-screen size."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => {const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}})",
        selector,
    )


def _open_report(driver, wait, row_id: str) -> None:
    from selenium.webdriver.common.by import By

    previous = driver.find_element(By.ID, "report").get_attribute("srcdoc") or ""
    driver.find_element(By.ID, row_id).click()
    wait.until(lambda d: (d.find_element(By.ID, "report").get_attribute("srcdoc") or "") not in ("", previous))


def test_web_page_uploads_submits_follows_and_shows_reports(service, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = service
    model = mlp(in_features=16, hidden=64, classes=4)
    model_path = save(model, tmp_path / "model.onnx")
    data_path = tmp_path / "data.npz"
    data_path.write_bytes(dataset_npz(model, samples=128))
    from selenium.common.exceptions import StaleElementReferenceException

    # The page re-renders its tables as events arrive: an element found a moment ago may be replaced.
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    page = browser
    page.get(f"{url}/ui")
    assert page.title == "modelshrink"

    page.find_element(By.ID, "api-key").send_keys(key)
    page.find_element(By.ID, "save-key").click()
    assert page.execute_script("return sessionStorage.getItem('modelshrink.apiKey')") == key
    page.find_element(By.ID, "model-file").send_keys(str(model_path))
    page.find_element(By.ID, "dataset-file").send_keys(str(data_path))
    page.find_element(By.ID, "upload").click()
    wait.until(lambda d: d.find_element(By.ID, "dataset-id").get_attribute("value").startswith("ds_"))
    assert page.find_element(By.ID, "model-id").get_attribute("value").startswith("mdl_")

    # A job: it appears, its progress arrives over the event stream, it succeeds.
    steps = page.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys('[{"method": "quantize", "mode": "int8_dynamic"}]')
    page.find_element(By.ID, "submit-job").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs tr.row .status.succeeded"))
    job_row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#jobs tr.row").get_attribute("id"))
    _open_report(page, wait, job_row)
    page.switch_to.frame(page.find_element(By.ID, "report"))
    bars = _rendered(page, "svg.bars")
    assert len(bars) >= 3 and all(b["w"] > 100 and b["h"] > 20 for b in bars)  # size, latency per batch, accuracy, fidelity
    assert len(_rendered(page, "svg.bars rect")) >= 6
    assert "modelshrink job" in page.find_element(By.TAG_NAME, "h1").text
    page.switch_to.default_content()
    assert _not_blank(_shot(page, "ui-job-report.png")) > 20
    # The row says which model, and links its artifacts; its report opens in a new tab through a signed link.
    row = page.find_element(By.ID, job_row)
    assert model_path.name in row.text and "model.onnx" in row.text, row.text
    row.find_element(By.LINK_TEXT, "report ↗").click()
    wait.until(lambda d: len(d.window_handles) == 2)
    page.switch_to.window(page.window_handles[1])
    wait.until(lambda d: "/v1/links/" in d.current_url and "modelshrink job" in d.find_element(By.TAG_NAME, "h1").text)
    page.close()
    page.switch_to.window(page.window_handles[0])

    # A search: started from the page, followed live, its report shows the Pareto scatter with the best.
    page.find_element(By.ID, "max-drop").send_keys("0.1")
    page.find_element(By.ID, "budget").clear()
    page.find_element(By.ID, "budget").send_keys("10")
    page.find_element(By.ID, "methods").send_keys("quantize, distill")
    page.find_element(By.ID, "submit-search").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#searches tr.row"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#searches tr.row .status.succeeded, #searches tr.row .status.failed"))
    assert page.find_elements(By.CSS_SELECTOR, "#searches tr.row .status.succeeded")
    # The search's candidates are listed under it, not among the jobs.
    assert len(page.find_elements(By.CSS_SELECTOR, "#searches tr.candidate")) >= 2 and len(page.find_elements(By.CSS_SELECTOR, "#jobs tr.row")) >= 1
    _open_report(page, wait, wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#searches tr.row").get_attribute("id")))
    page.switch_to.frame(page.find_element(By.ID, "report"))
    scatters = _rendered(page, "svg.pareto")
    assert len(scatters) == 2 and all(s["w"] > 300 and s["h"] > 200 for s in scatters)
    chosen = _rendered(page, "svg.pareto circle.chosen")
    assert len(chosen) == 2 and all(c["w"] > 0 for c in chosen)
    assert page.find_element(By.CSS_SELECTOR, "p.best").text.startswith("best:")
    rows = page.find_elements(By.CSS_SELECTOR, "table.candidates tr")
    assert len(rows) >= 3  # header and both recipes
    page.switch_to.default_content()
    assert _not_blank(_shot(page, "ui-search-report.png")) > 20


def test_page_without_a_key_says_so_and_a_wrong_key_is_refused(service, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = service
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "submit-job").click()
    WebDriverWait(browser, 10).until(lambda d: "API key" in d.find_element(By.ID, "message").text)
    browser.find_element(By.ID, "api-key").send_keys("msk_wrong")
    browser.find_element(By.ID, "save-key").click()
    WebDriverWait(browser, 10).until(lambda d: "unauthorized" in d.find_element(By.ID, "message").text)
