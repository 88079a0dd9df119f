"""`serve` through the real CLI: a LitServe server in its own process, asked over loopback HTTP as a client would,
and its web page driven in headless Chromium (Debian's chromium and chromium-driver)."""

import base64
import contextlib
import csv
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CLASSES, CONFIG, app_messages, cli_command, cli_env, fitted_copy, only
from PIL import Image

from cifar.cli import load_model, main

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
def server(fitted, tmp_path_factory):
    """The shared fit (`fitted`: configs/cifar.yaml, 2 epochs on 3 classes) copied, then `main.py serve --ckpt_path
    best` in it on a free loopback port. Batches wait 0.2 s for requests, so requests sent together share one.
    Fields: url, root (the copy, the server's working directory), data (its images), pid (the server's process,
    which leads its own process group)."""
    copy = fitted_copy(fitted, tmp_path_factory.mktemp("serve"))
    root = copy.root
    port = free_port()
    log = open(root / "serve.log", "w")
    command = cli_command(["serve", "--ckpt_path", "best", "--port", str(port), "--top", "3", "--batch_timeout", "0.2"])
    process = subprocess.Popen(command, cwd=root, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own process group: LitServe starts more processes
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
        yield SimpleNamespace(url=url, root=root, data=copy.data, pid=process.pid)
    finally:  # SIGTERM, as `kill` or a service manager stops it: every process of the server ends
        process.terminate()
        process.wait(timeout=30)
        deadline = time.time() + 2
        while (left := subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()):
            if time.time() > deadline:  # the others get 2 s after the main process
                break
            time.sleep(0.1)
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
    url = server.url
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
    with pytest.MonkeyPatch.context() as patch, app_messages() as said:  # in this process: no second start-up
        patch.chdir(server.root)
        main(["predict", "--config", CONFIG, "--ckpt_path", "best", "--data.predict_dir", str(folder),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    written = re.search(r"Predictions for 3 images written to (\S+)", "\n".join(said)).group(1)
    rows = csv.DictReader(open(server.root / written))
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


FORM = f"multipart/form-data; boundary={BOUNDARY}"
BAD = {  # what a client may send wrong: (body, content type, the status, words of the error)
    "not an image": (multipart([("images", "a.png", b"not an image")]), FORM, 415, "not a whole PNG or JPEG"),
    "truncated": (multipart([("images", "a.png", png((1, 2, 3))[:40])]), FORM, 415, "not a whole PNG or JPEG"),
    "empty file": (multipart([("images", "a.png", b"")]), FORM, 400, "is empty"),
    "empty body": (b"", "application/json", 400, "multipart form data"),
    "not JSON": (b"{images: ", "application/json", 400, "multipart form data"),
    "JSON, not an object": (b"[1, 2]", "application/json", 400, "multipart form data"),
    "nested too deep": (b"[" * 100_000, "application/json", 400, "multipart form data"),
    "wrong field": (multipart([("image", "a.png", png((1, 2, 3)))]), FORM, 422, "unknown form field 'image'"),
    "a text, not a file": (multipart([("images", "a.png", png((1, 2, 3)))]).replace(f"--{BOUNDARY}--".encode(), (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"\r\n\r\nhello\r\n--{BOUNDARY}--').encode()),
        FORM, 422, "image files"),
    "wrong JSON": (json.dumps({"files": []}).encode(), "application/json", 422, '{"images"'),
    "bad base64": (json.dumps({"images": ["!!"]}).encode(), "application/json", 422, "base64"),
    "too many": (multipart([("images", f"{i}.png", png((i, 0, 0))) for i in range(17)]), FORM, 413, "at most 16"),
    "too large": (multipart([("images", "a.png", b"x" * (9 * 2**20))]), FORM, 413, "too large"),
}


def assert_refused(case: str, status: int, answer: dict) -> None:
    _, _, want, says = BAD[case]
    assert status == want and list(answer) == ["error"], (case, status, answer)  # {"error": "..."} and nothing else
    assert says in answer["error"] and "\n" not in answer["error"], (case, answer)


def test_bad_requests_get_one_line_json_errors_and_the_server_keeps_serving(server):
    url = server.url
    for case, (body, content_type, _, _) in BAD.items():
        assert_refused(case, *post(url, body, content_type))
    status, answer = post(url, multipart([("images", "ok.png", png((5, 5, 5)))]), FORM)
    assert status == 200 and len(answer["predictions"]) == 1


def test_a_bad_request_fails_only_itself_not_the_requests_batched_with_it(server):
    """Good and bad requests sent together (the server's batches wait 0.2 s for more): each good one is answered
    as when sent alone, each bad one with its own error."""
    url = server.url
    good = [multipart([("images", f"{i}.png", png((40 * i, 200 - 40 * i, 90)))] * (i + 1)) for i in range(4)]
    alone = [post(url, body, FORM) for body in good]
    assert all(status == 200 for status, _ in alone) and [len(a["predictions"]) for _, a in alone] == [1, 2, 3, 4]
    bad = ["not an image", "truncated", "empty file", "wrong field", "bad base64", "not JSON"]
    requests = [(body, FORM) for body in good] + [BAD[case][:2] for case in bad]
    order = [0, 4, 1, 5, 6, 2, 7, 8, 3, 9]  # good and bad interleaved
    with ThreadPoolExecutor(len(order)) as pool:
        answers = list(pool.map(lambda i: post(url, *requests[i]), order))
    together = dict(zip(order, answers))
    for i, (_, answer) in enumerate(alone):  # the same, but for float rounding in a larger batch
        status, batched = together[i]
        assert status == 200 and len(batched["predictions"]) == len(answer["predictions"]), (i, status, batched)
        for mine, theirs in zip(batched["predictions"], answer["predictions"]):
            probability = {t["class"]: t["probability"] for t in theirs}
            assert {t["class"]: t["probability"] for t in mine} == pytest.approx(probability, abs=2e-6)
    for i, case in enumerate(bad, len(good)):
        assert_refused(case, *together[i])


def test_the_web_page_classifies_a_chosen_image_in_a_real_browser(server, tmp_path):
    url = server.url
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
        browser.get(f"{url}/ui")
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


def test_bf16_serving_runs_the_network_under_autocast_as_predict_does_with_bf16_mixed(server, tmp_path):
    """`--precision bf16-mixed` (configs/fast.yaml's trainer.precision), in-process: the LitAPI's own steps, on a
    batch of two requests (2 images and 1) and on one request unbatched (`--max_batch_size 1`), give the
    probabilities the `predict` command writes with the same `--trainer.precision` for the same images (its CSV;
    the 3 images in one batch, and the request's 2 alone), in bf16 as in 32-bit."""
    from cifar.serve import ClassifierAPI, images_of

    ckpt = only(server.root.glob("runs/cifar/*-fit-*/checkpoints/last.ckpt"))
    blobs = [png((200, 10, 10)), png((9, 9, 9)), png((10, 10, 200))]

    def predicted(precision: str, count: int) -> torch.Tensor:
        """The probabilities `predict --trainer.precision PRECISION` writes for the first `count` images."""
        folder = tmp_path / f"{precision}-{count}"
        (folder / "images").mkdir(parents=True)
        for i, blob in enumerate(blobs[:count]):
            (folder / "images" / f"{i}.png").write_bytes(blob)  # file order: the requests' order
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            main(["predict", "--config", CONFIG, "--ckpt_path", str(ckpt), "--data.data_dir", str(server.data),
                  "--data.predict_dir", str(folder / "images"), "--trainer.precision", precision,
                  "--trainer.default_root_dir", str(folder / "runs"), "--trainer.logger", "false",
                  "--trainer.enable_progress_bar", "false"])  # fmt: skip
        rows = list(csv.DictReader(only((folder / "runs").glob("*-predict-*/predictions.csv")).open()))
        assert [Path(row["file"]).name for row in rows] == [f"{i}.png" for i in range(count)]
        return torch.tensor([[float(row[f"p_{c}"]) for c in CLASSES] for row in rows])

    request = {"images": [base64.b64encode(blob).decode() for blob in blobs[:2]]}
    other = {"images": [base64.b64encode(blobs[2]).decode()]}
    probs = {}
    for precision in ("32-true", "bf16-mixed"):
        api = ClassifierAPI(load_model(ckpt), top=3, max_batch_size=64, batch_timeout=0.0, precision=precision)
        api.setup("cpu")
        x, y = (api.decode_request(images_of(r, max_images=16).numpy()) for r in (request, other))
        batched, other_probs = api.unbatch(api.predict(api.batch([x, y])))
        assert len(batched) == 2 and len(other_probs) == 1
        probs[precision] = torch.cat([batched, other_probs])
        # The CSV holds 6 decimals.
        torch.testing.assert_close(probs[precision], predicted(precision, 3), rtol=0, atol=2e-6)
        torch.testing.assert_close(api.predict(x), predicted(precision, 2), rtol=0, atol=2e-6)  # unbatched
    difference = (probs["32-true"] - probs["bf16-mixed"]).abs().max().item()
    assert 1e-4 < difference < 0.02  # bf16 ran, far past the CSV's rounding, and only rounded


def written(group: int) -> int:
    """The bytes the processes of a process group have written so far, to files, pipes or sockets (`wchar` of
    /proc/<pid>/io)."""
    total = 0
    for pid in subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(re.search(r"wchar: (\d+)", Path(f"/proc/{pid}/io").read_text())[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/<pid>/io (Linux)")
def test_uploads_stay_in_memory(server):
    """Starlette spools an upload over 1 MB to a temporary file; the server keeps one up to its request limit in
    memory (cifar/serve.py relies on LitServe for it): a 6 MB image uploaded to the running server is answered,
    and none of the server's processes wrote anything near its size while they read it."""
    from cifar.serve import MAX_REQUEST_BYTES

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(buffer, "PNG", compress_level=1)
    big = buffer.getvalue()
    assert 5 * 2**20 < len(big) < MAX_REQUEST_BYTES - 2**16  # room for the multipart headers
    before = written(server.pid)
    status, answer = post(server.url, multipart([("images", "big.png", big)]), FORM)
    after = written(server.pid)
    assert status == 200 and len(answer["predictions"]) == 1, answer
    assert after - before < 2**20, f"the server wrote {after - before} bytes while it read a {len(big)}-byte upload"


def test_serve_reads_its_checkpoint_once_and_ships_the_model_to_its_worker(fitted, monkeypatch):
    """`serve` rebuilds the model in the main process from one read of the checkpoint; LitServe's worker (a spawned
    process: the API goes to it pickled) gets the model, not a path to read again."""
    import litserve

    from cifar.serve import ClassifierAPI

    checkpoint = fitted.run / "checkpoints" / "last.ckpt"
    reads, load, started = [], torch.load, []
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: reads.append(path) or load(path, *args, **kwargs))
    monkeypatch.setattr(litserve.LitServer, "run", lambda server, **options: started.append(server.lit_api))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # serve's SIGTERM handler: not for this process
    main(["serve", "--ckpt_path", str(checkpoint)])
    assert reads == [checkpoint]  # the checkpoint itself: not the tensors the pickle below reads back
    api = pickle.loads(pickle.dumps(started[0]))  # as the spawned worker gets it
    assert isinstance(api, ClassifierAPI)
    api.setup("cpu")
    answer = api.encode_response(api.predict(api.decode_request(np.zeros((1, 3, 32, 32), dtype=np.uint8))))
    assert [path for path in reads if isinstance(path, Path)] == [checkpoint] and {p["class"] for p in answer["predictions"][0]} == set(CLASSES)
