"""`serve` through the real CLI: a LitServe server in its own process, asked over loopback HTTP as a client would,
and its web page driven in headless Chromium (Debian's chromium and chromium-driver)."""

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, CONFIG, FAST, cli_command, cli_env, run_cli
from PIL import Image

BOUNDARY = "cifar-test-boundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(color: tuple[int, int, int], size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str, bytes]]) -> bytes:
    body = b""
    for field, name, data in parts:
        body += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"  # fmt: skip
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fit of one epoch on 3 classes, then `main.py serve --ckpt_path best` on a free loopback port."""
    from conftest import make_folder_data

    root = tmp_path_factory.mktemp("serve")
    data = make_folder_data(root / "data")
    run_cli(["fit", "--config", CONFIG, "--data.data_dir", str(data), "--data.val_size", "12", *FAST,
             "--trainer.max_epochs", "1"], root)  # fmt: skip
    port = free_port()
    log = open(root / "serve.log", "w")
    process = subprocess.Popen(cli_command(["serve", "--ckpt_path", "best", "--port", str(port), "--top", "3"]),
                               cwd=root, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own process group: LitServe starts more processes  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # start-up: imports, the model, LitServe's worker
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert process.poll() is None, (root / "serve.log").read_text()
            time.sleep(0.5)
        else:
            raise AssertionError(f"no /health in 60 s:\n{(root / 'serve.log').read_text()}")
        yield url, root, data
    finally:  # SIGTERM, as `kill` or a service manager stops it: every process of the server ends
        process.terminate()
        process.wait(timeout=30)
        time.sleep(2)
        left = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()
        if left:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        assert not left, f"processes of the server left after SIGTERM: {left}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_serve_answers_what_predict_computes_in_both_request_forms(server, tmp_path):
    url, root, data = server
    info = json.loads(urllib.request.urlopen(f"{url}/info").read())["model"]
    assert info["classes"] == CLASSES and info["checkpoint"].endswith(".ckpt") and info["max_images"] == 16
    assert info["net"] == "TutorialCNN" and info["precision"] == "32-true" and info["tta"] == 0
    images = {"red.png": png((200, 10, 10)), "big.jpg": None, "gray.png": png((90, 90, 90), (7, 5))}
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 180, 40)).save(buffer, "JPEG")
    images["big.jpg"] = buffer.getvalue()

    folder = tmp_path / "mine"  # the same files through `predict`
    folder.mkdir()
    for name, blob in images.items():
        (folder / name).write_bytes(blob)
    predict = run_cli(["predict", "--config", CONFIG, "--ckpt_path", "best", "--data.predict_dir", str(folder),
                       "--trainer.logger", "false"], root)  # fmt: skip
    written = re.search(r"Predictions for 3 images written to (\S+)", predict.stdout + predict.stderr).group(1)
    rows = csv.DictReader(open(root / written))
    expected = {Path(r["file"]).name: {c: float(r[f"p_{c}"]) for c in CLASSES} for r in rows}

    names = sorted(images)
    status, multi = post(url, multipart([("images", n, images[n]) for n in names]), f"multipart/form-data; boundary={BOUNDARY}")
    assert status == 200, multi
    status, js = post(url, json.dumps({"images": [base64.b64encode(images[n]).decode() for n in names]}).encode(),
                      "application/json")  # fmt: skip
    assert status == 200 and js == multi
    for name, top in zip(names, multi["predictions"]):
        assert [t["class"] for t in top] == sorted(CLASSES, key=lambda c: -expected[name][c])  # most probable first
        for t in top:
            assert t["probability"] == pytest.approx(expected[name][t["class"]], abs=2e-6)


def test_bad_requests_get_one_line_json_errors_and_the_server_keeps_serving(server):
    url, _, _ = server
    form = f"multipart/form-data; boundary={BOUNDARY}"
    cases = {
        "not an image": (multipart([("images", "a.png", b"not an image")]), form, 415, "not a whole PNG or JPEG"),
        "truncated": (multipart([("images", "a.png", png((1, 2, 3))[:40])]), form, 415, "not a whole PNG or JPEG"),
        "empty file": (multipart([("images", "a.png", b"")]), form, 400, "is empty"),
        "empty body": (b"", "application/json", 400, "multipart form data"),
        "not JSON": (b"{images: ", "application/json", 400, "multipart form data"),
        "wrong field": (multipart([("image", "a.png", png((1, 2, 3)))]), form, 422, "unknown form field 'image'"),
        "wrong JSON": (json.dumps({"files": []}).encode(), "application/json", 422, '{"images"'),
        "bad base64": (json.dumps({"images": ["!!"]}).encode(), "application/json", 422, "base64"),
        "too many": (multipart([("images", f"{i}.png", png((i, 0, 0))) for i in range(17)]), form, 413, "at most 16"),
        "too large": (multipart([("images", "a.png", b"x" * (9 * 2**20))]), form, 413, "too large"),
    }
    for case, (body, content_type, want, says) in cases.items():
        status, answer = post(url, body, content_type)
        message = answer.get("error") or answer.get("detail")
        assert (status, "\n" not in message) == (want, True) and says in message, (case, status, answer)
    status, answer = post(url, multipart([("images", "ok.png", png((5, 5, 5)))]), form)
    assert status == 200 and len(answer["predictions"]) == 1


def test_the_web_page_classifies_a_chosen_image_in_a_real_browser(server, tmp_path):
    url, _, _ = server
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        assert os.environ.get("CI") != "true", "CI must run the browser test: apt-get install chromium chromium-driver"
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.png"
    image.write_bytes(png((200, 10, 10)))
    status, answer = post(url, multipart([("images", "red.png", image.read_bytes())]), f"multipart/form-data; boundary={BOUNDARY}")
    assert status == 200
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(f"{url}/")
        WebDriverWait(browser, 20).until(lambda b: "checkpoint" in b.find_element(By.ID, "model").text)
        assert ", ".join(CLASSES) in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "files").send_keys(str(image))
        names = WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .bar .name"))
        assert names[0].text == answer["predictions"][0][0]["class"]  # the page shows the server's top class
        assert browser.find_element(By.CSS_SELECTOR, ".result .bar .p").text.endswith("%")
        if shot := os.environ.get("CIFAR_SCREENSHOT"):  # how docs/serve.png was made
            browser.save_screenshot(shot)
    finally:
        browser.quit()


def test_bf16_serving_runs_the_network_under_autocast_as_predict_does_with_bf16_mixed(server):
    """`--precision bf16-mixed` (configs/fast.yaml's trainer.precision), in-process: the LitAPI's own steps."""
    from cifar.serve import ClassifierAPI

    _, root, _ = server
    ckpt = next((root / "runs" / "cifar").glob("*-fit-*/checkpoints/last.ckpt"))
    request = {"images": [base64.b64encode(png((200, 10, 10))).decode(), base64.b64encode(png((9, 9, 9))).decode()]}
    probs = {}
    for precision in ("32-true", "bf16-mixed"):
        api = ClassifierAPI(ckpt, top=3, max_images=16, max_batch_size=64, batch_timeout=0.0, precision=precision)
        api.setup("cpu")
        probs[precision] = api.unbatch(api.predict(api.batch([api.decode_request(request)])))[0]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            expected = api.model(api.decode_request(request)).float()
        assert torch.equal(probs[precision], expected)
    assert not torch.equal(probs["32-true"], probs["bf16-mixed"])
    assert torch.allclose(probs["32-true"], probs["bf16-mixed"], atol=0.02)


def test_uploads_stay_in_memory():
    """Starlette spools an upload over 1 MB to a temporary file; with cifar.serve loaded (as in the server's
    processes) one up to the request limit stays in memory."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    import cifar.serve

    async def spooled(request):
        upload = (await request.form())["images"]
        return JSONResponse({"on_disk": upload.file._rolled, "size": len(await upload.read())})

    client = TestClient(Starlette(routes=[Route("/", spooled, methods=["POST"])]))
    size = cifar.serve.MAX_REQUEST_BYTES - 2**16  # room for the multipart headers
    answer = client.post("/", files={"images": ("big.png", b"x" * size)}).json()
    assert answer == {"on_disk": False, "size": size}
