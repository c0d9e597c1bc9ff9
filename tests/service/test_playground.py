"""The playground page (`/` on the HTTP port) in a real headless browser: Debian's chromium driven
by chromium-driver through selenium, against `serve --http-port` with tokens on the tiny Wan2.1
image-to-video checkpoint (so the page's image input is exercised too).

Loads the page, types the token, picks the model, attaches the input image, submits, waits for the
result element, checks the progress bar reached N/N, takes a screenshot, reads the shown image's
pixels back (they equal the job's PNG) and reproduces the shown seed over gRPC (the same bytes).
Also: an error the server returns is shown with its param; a video shows in <video>; Cancel
cancels; the page loads nothing from outside and breaks no CSP rule; no chromium or chromedriver
process outlives the module. `.ci/run` installs chromium and chromium-driver.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai SDK brings
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "alice-token-0123456789abcdef"
STEPS = 3
PROMPT = "a red fox"
WAIT_S = 90  # the longest wait for one element (2 shared cores)

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver; .ci/run installs them)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.fixtures.tiny import build

    workdir = tmp_path_factory.mktemp("playground")
    checkpoint = build("wan21-i2v", workdir / "tiny-wan-i2v")
    tokens = workdir / "tokens.txt"
    tokens.write_text(f"alice {TOKEN}\n")
    tokens.chmod(0o600)
    server = ServerProcess(checkpoint, workdir, "--http-port", "0", "--auth-tokens", str(tokens))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def input_png(tmp_path_factory) -> Path:
    """A structured RGB image whose size differs from the requests' (the server resizes it)."""
    y, x = np.mgrid[0:40, 0:56]
    pixels = np.stack([x * 4 % 256, y * 6 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("input") / "input.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium (a fresh profile, no background connections); afterwards no chromium or
    chromedriver process is left."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("browser")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                f"--user-data-dir={folder / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(folder / "chromedriver.log"))
    driver = None
    processes: list[psutil.Process] = []
    try:
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_script_timeout(30)
        root = psutil.Process(service.process.pid)
        processes = [root, *root.children(recursive=True)]
        assert any("chrom" in p.name() for p in processes[1:]), [p.name() for p in processes]
        yield driver
        assert not csp_violations(driver)
    finally:
        if driver is not None:
            try:  # the renderers started since
                processes = list({p.pid: p for p in [*processes, *processes[0].children(recursive=True)]}.values())
            except (psutil.Error, IndexError):
                pass
            driver.quit()
        _, alive = psutil.wait_procs(processes, timeout=20)
        for p in alive:
            p.kill()
        assert not alive, f"left running after driver.quit(): {[(p.pid, p.name()) for p in alive]}"


def csp_violations(driver) -> list[str]:
    """The browser console's CSP violations since the last call (reading the log empties it)."""
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def wait_for(driver, condition, what: str, timeout_s: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what} (state: {by_id(driver, 'state').text!r}, "
                             f"error: {by_id(driver, 'error').text!r})") from None


def fill(driver, element_id: str, text: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(text)


def open_page(driver, server: ServerProcess) -> str:
    """Loads the page with the token in its field and the model picked; the model's name."""
    from selenium.webdriver.support.ui import Select

    driver.get(f"http://127.0.0.1:{server.http_port}/")
    if by_id(driver, "token").get_attribute("value") != TOKEN:
        # without the token the page shows the API's 401
        wait_for(driver, lambda d: "bearer token" in by_id(d, "error").text, "the missing-token error")
        fill(driver, "token", TOKEN)
        by_id(driver, "reload-models").click()
    wait_for(driver, lambda d: by_id(d, "model").get_attribute("data-loaded") == "true", "the model list")
    assert not by_id(driver, "error").is_displayed(), by_id(driver, "error").text
    (model,) = server.client.__class__(server.target, token=TOKEN).list_models()
    Select(by_id(driver, "model")).select_by_value(model.name)
    return model.name


def fill_request(driver, input_png: Path, frames: int, steps: int = STEPS) -> None:
    fill(driver, "prompt", PROMPT)
    fill(driver, "steps", str(steps))
    fill(driver, "width", "32")
    fill(driver, "height", "32")
    fill(driver, "frames", str(frames))
    by_id(driver, "image").send_keys(str(input_png))


def submit_and_wait(driver) -> None:
    by_id(driver, "submit").click()
    wait_for(driver, lambda d: by_id(d, "result").get_attribute("data-ready") == "true", "the result")
    assert not by_id(driver, "error").is_displayed(), by_id(driver, "error").text
    assert by_id(driver, "state").text == "succeeded"
    progress = by_id(driver, "progress")
    assert (progress.get_attribute("value"), progress.get_attribute("max")) == (str(STEPS), str(STEPS))
    assert by_id(driver, "progress-text").text == f"{STEPS}/{STEPS}"


def shown_image(driver) -> Image.Image:
    """The pixels #result-image shows, read back through a canvas (PNG, lossless)."""
    url = driver.execute_script("""
        const img = document.getElementById("result-image");
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        canvas.getContext("2d").drawImage(img, 0, 0);
        return canvas.toDataURL("image/png");""")
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


def api(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_page_is_static_and_locked_down(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        page = http.get("/")  # open: no token
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert "<script>" not in page.text and "<style" not in page.text and "://" not in page.text  # no inline code, no outside URL
        for name, media_type in (("playground.js", "text/javascript"), ("playground.css", "text/css"), ("favicon.svg", "image/svg+xml")):
            assert http.get(f"/static/{name}").headers["content-type"].startswith(media_type)
            assert "://" not in http.get(f"/static/{name}").text.replace("http://www.w3.org/2000/svg", "")
        assert http.get("/static/nothing.js").status_code == 404
        assert http.get("/static/..%2Fplayground.py").status_code == 404
        assert http.get("/v1/models").status_code == 401  # the API behind the page is not open


def test_generate_show_and_reproduce(server, browser, input_png, tmp_path):
    from diffserve.v1 import generation_pb2 as pb

    model = open_page(browser, server)
    assert browser.execute_script("return sessionStorage.getItem('diffserve.token')") == TOKEN
    assert "image-to-video" in by_id(browser, "model-info").text
    assert by_id(browser, "frames-row").is_displayed() and by_id(browser, "image-row").is_displayed()

    # an error from the server is shown with the field it names (frames must be 4k+1)
    fill_request(browser, input_png, frames=2)
    by_id(browser, "submit").click()
    wait_for(browser, lambda d: by_id(d, "error").is_displayed(), "the error of frames=2")
    assert "num_frames" in (by_id(browser, "error").get_attribute("data-param") or ""), by_id(browser, "error").text

    # a real job: progress to N/N, the image, its seed
    fill(browser, "frames", "1")
    submit_and_wait(browser)
    assert by_id(browser, "result-image").is_displayed() and not by_id(browser, "result-video").is_displayed()
    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot))
    Image.open(screenshot).verify()

    job_id = by_id(browser, "job-id").text
    seed = int(by_id(browser, "seed").text)
    with api(server) as http:
        content = http.get(f"/v1/jobs/{job_id}/content").content
        record = http.get(f"/v1/jobs/{job_id}").json()
    assert int(record["params"]["seed"]) == seed
    assert base64.b64decode(record["params"]["images"][0]["data"]) == input_png.read_bytes()  # the file's bytes, as sent
    png = Image.open(io.BytesIO(content))
    assert png.size == (32, 32)
    shown = shown_image(browser)
    assert shown.size == (32, 32) and shown.convert("RGB").tobytes() == png.convert("RGB").tobytes()

    # the shown seed reproduces the image over gRPC
    with server.client.__class__(server.target, token=TOKEN) as grpc_client:
        job = grpc_client.submit(PROMPT, model=model, seed=seed, num_inference_steps=STEPS, width=32, height=32, num_frames=1,
                                 images=[input_png.read_bytes()])
        assert grpc_client.wait(job.id).state == pb.JOB_STATE_SUCCEEDED
        assert grpc_client.download(job.id) == content

    # the page broke no CSP rule, and the CSP is enforced: an outside image is refused
    assert not csp_violations(browser)
    browser.execute_script("document.body.insertAdjacentHTML('beforeend', '<img id=outside src=\"https://example.invalid/x.png\">')")
    wait_for(browser, lambda d: any("example.invalid" in m for m in csp_violations(d)), "the CSP refusal", timeout_s=10)


def test_video_and_cancel(server, browser, input_png):
    open_page(browser, server)  # the token comes back from sessionStorage
    fill_request(browser, input_png, frames=5)
    submit_and_wait(browser)
    video = by_id(browser, "result-video")
    assert video.is_displayed() and not by_id(browser, "result-image").is_displayed()
    assert browser.execute_script("return arguments[0].src.startsWith('blob:') && arguments[0].videoWidth", video) == 32

    # Cancel: a long job stops at its next step
    fill(browser, "steps", "1000")
    by_id(browser, "submit").click()
    wait_for(browser, lambda d: by_id(d, "cancel").is_enabled() and by_id(d, "job-id").text != "–", "the Cancel button")
    job_id = by_id(browser, "job-id").text
    by_id(browser, "cancel").click()
    wait_for(browser, lambda d: by_id(d, "state").text == "cancelled", "the cancelled state")
    assert by_id(browser, "error").is_displayed() and not by_id(browser, "result").is_displayed()
    with api(server) as http:
        record = http.get(f"/v1/jobs/{job_id}").json()
    assert record["state"] == "JOB_STATE_CANCELLED" and record.get("step", 0) < 1000
