"""The page `onnxcam serve` shows at `/`, driven in a real headless browser (Debian's chromium + chromedriver,
through selenium) against the real server: what it shows must be the API's answer for what was clicked.

Needs `apt-get install chromium chromium-driver` (.ci/run installs them). Without them the test is skipped with a
warning, unless ONNXCAM_REQUIRE_BROWSER=1 (set by .ci/run), where it fails. ONNXCAM_SCREENSHOT=PATH also saves
the page's screenshot there (docs/ui.png is made so)."""
from __future__ import annotations

import base64
import io
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.test_serve import MODEL, ROOT, Server, httpx

import onnxcam  # noqa: E402
from onnxcam.images import render  # noqa: E402
from PIL import Image  # noqa: E402

PHOTO = ROOT / "models" / "cat_and_cup.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The page receives V1 heatmaps, rounded to serve.HEATMAP_DECIMALS = 4 decimals: half a step, plus float32.
HEATMAP_ATOL = 0.5e-4 + 1e-6
MUG, CAT = 504, 285


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    reason = (f"BROWSER TEST NOT RUN: {', '.join(missing)} missing; apt-get install chromium chromium-driver "
              f"(as .ci/run does)")
    if os.environ.get("ONNXCAM_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    warnings.warn(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_or_skip()
    s = Server(tmp_path_factory.mktemp("ui"))
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--force-color-profile=srgb", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look anything up on the network
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.downloads = downloads
    yield driver
    driver.quit()


def severe(driver) -> list:
    """The browser console's errors since the last call: script errors, CSP violations, failed fetches."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(driver, condition: str, timeout: float = 60.0):
    """Waits until the JavaScript expression `condition` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({condition});")
        if value:
            return value
        if time.monotonic() > deadline:
            status = driver.execute_script("return document.body.dataset.status + ': ' + "
                                           "document.getElementById('status').textContent;")
            raise AssertionError(f"timed out waiting for {condition}; page {status}")
        time.sleep(0.05)


def explained(driver, label: str, method: str, counterfactual: bool = False) -> str:
    return wait_for(driver, f"document.body.dataset.status === 'ready' && "
                            f"document.getElementById('overlay').dataset.label === {label!r} && "
                            f"document.getElementById('overlay').dataset.method === {method!r} && "
                            f"document.getElementById('overlay').dataset.counterfactual === "
                            f"{str(counterfactual).lower()!r}")


def page_heatmap(driver) -> np.ndarray:
    h, w = driver.execute_script("return window.onnxcam.heatmapShape;")
    return np.float32(driver.execute_script("return Array.from(window.onnxcam.heatmap);")).reshape(h, w)


def canvas_pixels(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('overlay').toDataURL('image/png');")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB"), np.int16)


def assert_overlay(got: np.ndarray, want: Image.Image):
    """The page draws the overlay itself; it must be the one onnxcam.images.render.overlay draws (float rounding may
    move a channel by one level)."""
    want = np.asarray(want, np.int16)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_page_explains_what_is_clicked(server, browser, tmp_path):
    photo = Image.open(PHOTO).convert("RGB")
    gradcam = onnxcam.Explainer(str(MODEL))
    top = gradcam.explain_image(PHOTO)
    cat_map = top.heatmaps[0]
    mug = gradcam.explain_image(PHOTO, MUG)

    browser.get(server.url + "/")
    wait_for(browser, "document.body.dataset.status === 'idle'")
    methods = browser.execute_script("return Array.from(document.getElementById('method').options, o => o.value);")
    assert methods[0] == "gradcam" and "gradcam++" in methods and "scorecam" not in methods

    browser.find_element("id", "file").send_keys(str(PHOTO))
    explained(browser, "Egyptian cat", "gradcam")
    # The top five, in order, with their probabilities: the model's own.
    p = np.exp(top.scores[0] - top.scores[0].max())
    p /= p.sum()
    want_top = [(gradcam.labels[k], f"{100 * p[k]:.1f}%") for k in np.argsort(-p)[:5]]
    shown = browser.execute_script("return Array.from(document.querySelectorAll('#top button'), "
                                   "b => [b.querySelector('.name').textContent, b.querySelector('.p').textContent]);")
    assert [tuple(s) for s in shown] == want_top
    np.testing.assert_allclose(page_heatmap(browser), cat_map, atol=HEATMAP_ATOL)

    browser.find_element("css selector", f"#top button[data-class='{MUG}']").click()
    explained(browser, "coffee mug", "gradcam")
    shown_map = page_heatmap(browser)
    np.testing.assert_allclose(shown_map, mug.heatmaps[0], atol=HEATMAP_ATOL)
    assert np.abs(shown_map - cat_map).max() > 0.5  # the two classes' maps differ: the check above can fail
    assert browser.execute_script("return document.querySelector('#top button.active').dataset.class;") == str(MUG)
    assert_overlay(canvas_pixels(browser), render.overlay(photo, shown_map, alpha=0.5))
    # ... and it is the overlay the API itself sends for this class.
    api = httpx.post(f"{server.url}/v1/models/{MODEL.stem}:explain", timeout=60, json={
        "instances": [base64.b64encode(PHOTO.read_bytes()).decode()], "target": "coffee mug", "overlay": True})
    assert_overlay(canvas_pixels(browser), Image.open(io.BytesIO(base64.b64decode(api.json()["explanations"][0]
                                                                                   ["overlay"]))).convert("RGB"))

    shot = tmp_path / "ui.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("ONNXCAM_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ONNXCAM_SCREENSHOT"])

    # Download: the file is the overlay on the screen.
    browser.find_element("id", "download").click()
    name = "cat_and_cup_coffee_mug_gradcam.png"
    deadline = time.monotonic() + 20
    while not (browser.downloads / name).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (browser.downloads / name).exists(), list(browser.downloads.iterdir())
    downloaded = np.asarray(Image.open(browser.downloads / name).convert("RGB"), np.int16)
    assert np.array_equal(downloaded, canvas_pixels(browser))

    # Opacity redraws from the same map.
    browser.execute_script("const a = document.getElementById('alpha'); a.value = '0.8';"
                           "a.dispatchEvent(new Event('input'));")
    wait_for(browser, "document.getElementById('overlay').dataset.alpha === '0.8'")
    assert_overlay(canvas_pixels(browser), render.overlay(photo, shown_map, alpha=0.8))

    # Another method, then its counterfactual: each the API's map for the mug.
    plus = onnxcam.Explainer(str(MODEL), method="gradcam++")
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "method")).select_by_value("gradcam++")
    explained(browser, "coffee mug", "gradcam++")
    np.testing.assert_allclose(page_heatmap(browser), plus.explain_image(PHOTO, MUG).heatmaps[0], atol=HEATMAP_ATOL)
    browser.find_element("id", "counterfactual").click()
    explained(browser, "coffee mug", "gradcam++", counterfactual=True)
    want_cf = plus.explain_image(PHOTO, MUG, counterfactual=True).heatmaps[0]
    np.testing.assert_allclose(page_heatmap(browser), want_cf, atol=HEATMAP_ATOL)
    assert np.abs(want_cf - plus.explain_image(PHOTO, MUG).heatmaps[0]).max() > 0.2  # (0.46: Grad-CAM++ weighs g^2)

    assert not severe(browser)

    # A typed label; a misspelt one says what comes close.
    browser.find_element("id", "counterfactual").click()
    explained(browser, "coffee mug", "gradcam++")
    Select(browser.find_element("id", "method")).select_by_value("gradcam")
    explained(browser, "coffee mug", "gradcam")
    box = browser.find_element("id", "label")
    box.send_keys("tabby")
    browser.find_element("id", "label-go").click()
    explained(browser, "tabby", "gradcam")
    np.testing.assert_allclose(page_heatmap(browser), gradcam.explain_image(PHOTO, 281).heatmaps[0],
                               atol=HEATMAP_ATOL)
    box.clear()
    box.send_keys("cofee mug")
    browser.find_element("id", "label-go").click()
    message = wait_for(browser, "document.body.dataset.status === 'error' && "
                                "document.getElementById('status').textContent")
    assert "matches no class label; did you mean 'coffee mug'" in message
    assert [e["message"].split(" - ")[-1] for e in severe(browser)] == [
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"]


def test_page_is_self_contained(server):
    """No CDN, no build step: the page and its two files come from the server, under a policy that lets the
    browser load nothing from elsewhere; unknown assets are 404."""
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http" not in page.text.replace(server.url, "")
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.url}/ui/{asset}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert (Path(onnxcam.__file__).parent / "ui" / asset).read_bytes() == r.content
    for bad in ("/ui/../serve.py", "/ui/index.htm", "/ui/%2e%2e%2fserve.py"):
        assert httpx.get(server.url + bad, timeout=30).status_code == 404
    info = httpx.get(server.url + "/ui/info", timeout=30).json()
    assert info["method"] == "gradcam" and len(info["labels"]) == 1000 and info["input_size"] == [224, 224]
    assert [m["name"] for m in info["methods"] if m["default"]] == ["gradcam"]


def test_explain_method_and_counterfactual_fields(server):
    """What the page's method and counterfactual controls send: :explain's "method" and "counterfactual"."""
    cat = base64.b64encode((ROOT / "models" / "cat.png").read_bytes()).decode()
    url = f"{server.url}/v1/models/{MODEL.stem}:explain"
    layer = onnxcam.Explainer(str(MODEL), method="layercam")
    x = layer.explain_image(ROOT / "models" / "cat.png").extras["input"]
    r = httpx.post(url, json={"instances": [cat], "target": 281, "method": "layercam", "counterfactual": True},
                   timeout=120)
    assert r.status_code == 200, r.text[:300]
    (e,) = r.json()["explanations"]
    assert (e["class"], e["method"], e["counterfactual"]) == (281, "layercam", True)
    np.testing.assert_allclose(e["heatmap"], layer.explain(x, 281, counterfactual=True).heatmaps[0], atol=HEATMAP_ATOL)
    for body, message in (
            ({"method": "scorecam"}, 'method: "scorecam" is not a method this server runs; it runs gradcam, '),
            ({"method": 3}, "method: 3 is not a method"),
            ({"counterfactual": "yes"}, "counterfactual must be true or false"),
            ({"method": "eigencam", "counterfactual": True}, "counterfactual maps need gradients"),
            ({"methods": "gradcam"}, "unknown field(s) methods")):
        r = httpx.post(url, json={"instances": [cat], **body}, timeout=120)
        assert r.status_code == 400 and message in r.json()["error"], r.text[:300]


def test_method_set_builds_each_method_once():
    from onnxcam.serve import ApiError, MethodSet, Sample, explain_batch

    ex = onnxcam.Explainer(str(MODEL))
    with pytest.raises(onnxcam.OnnxcamError, match="unknown method 'nope'"):
        MethodSet(ex, ["nope"])
    methods = MethodSet(ex, ["hirescam", "xgradcam"])
    calls = []
    real = methods._build

    def build(name):
        calls.append(name)
        if name == "xgradcam":
            raise onnxcam.OnnxcamError("cannot build")
        return real(name)

    methods._build = build
    x = ex.explain_image(ROOT / "models" / "cat.png").extras["input"][0]
    for _ in range(2):
        hires, failed, own = explain_batch(methods, [Sample(x, 504, "hirescam"), Sample(x, 504, "xgradcam"),
                                                     Sample(x, 504)])
        np.testing.assert_allclose(hires.heatmap, onnxcam.Explainer(str(MODEL), method="hirescam").explain(
            x[None], 504).heatmaps[0], atol=1e-6)
        assert isinstance(failed, ApiError) and failed.status == 400 and "cannot build" in failed.message
        np.testing.assert_allclose(own.heatmap, ex.explain(x[None], 504).heatmaps[0], atol=1e-6)
    assert calls == ["hirescam", "xgradcam"]  # built (or failed) once, not per request
