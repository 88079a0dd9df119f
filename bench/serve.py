"""Load test of `main.py serve` on loopback: requests/s and p50/p99 latency at 1, 8 and 64 concurrent clients,
with LitServe's batching on (max_batch_size 64) and off (1), against the bare model's images/s in-process.

Each client sends one 32x32 PNG per request (multipart, as the web page does), again as soon as it has its answer,
until about `--requests` answers (at most one more per client) or `--seconds` have passed for that setting: bounded in count and time, and the
server listens on 127.0.0.1 only. The clients are threads of this process, on the same CPU as the server.

    python bench/serve.py --ckpt_path runs/cifar/<run>/checkpoints/last.ckpt
"""

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cifar.cli import load_model  # noqa: E402
from cifar.module import Probabilities  # noqa: E402

BOUNDARY = "bench"


def request_body() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 200)).save(buffer, "PNG")
    header = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n\r\n'.encode()
    return header + buffer.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt_path: str, max_batch_size: int, precision: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "main.py"), "serve", "--ckpt_path", ckpt_path, "--port", str(port),
               "--max_batch_size", str(max_batch_size), "--precision", precision]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"ok":
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server on {url} did not come up")


def load(url: str, clients: int, requests: int, seconds: float, body: bytes) -> dict:
    """`clients` threads sending requests back to back; returns requests/s and latency percentiles (ms)."""
    latencies, lock, failures = [], threading.Lock(), [0]
    deadline = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < deadline:
            with lock:
                if len(latencies) + failures[0] >= requests:
                    return
            request = urllib.request.Request(f"{url}/predict", data=body,
                                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})  # fmt: skip
            start = time.perf_counter()
            try:
                urllib.request.urlopen(request, timeout=30).read()
                with lock:
                    latencies.append(time.perf_counter() - start)
            except OSError:
                with lock:
                    failures[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)
    return {"answered": len(ms), "failed": failures[0], "per_s": len(ms) / elapsed,
            "p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}  # fmt: skip


def in_process_images_per_s(ckpt_path: str, batch: int, precision: str, seconds: float = 5.0) -> float:
    """The bare model (as served: normalization, TTA, softmax, precision) on uint8 batches of `batch`, no HTTP."""
    served = Probabilities(load_model(ckpt_path).classifier).eval()
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        served(images)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            served(images)
            n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt path (`best`/`last` are the app's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=2000, help="answers per setting (each client stops after)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per setting, at most")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true", help="serve's --precision")
    args = parser.parse_args()

    bare = {b: in_process_images_per_s(args.ckpt_path, b, args.precision) for b in (1, 64)}
    print(f"in-process, bare model: {bare[1]:.0f} images/s at batch 1, {bare[64]:.0f} images/s at batch 64")
    body = request_body()
    print("| batching | clients | answered | failed | images/s | % of in-process batch 64 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for max_batch_size in (64, 1):
        process, url = start_server(args.ckpt_path, max_batch_size, args.precision)
        try:
            load(url, 8, 50, 10, body)  # warm-up
            for clients in args.clients:
                r = load(url, clients, args.requests, args.seconds, body)
                print(f"| {'on (64)' if max_batch_size > 1 else 'off'} | {clients} | {r['answered']} | {r['failed']} | "
                      f"{r['per_s']:.0f} | {100 * r['per_s'] / bare[64]:.0f}% | {r['p50']:.0f} | {r['p99']:.0f} |", flush=True)  # fmt: skip
        finally:  # SIGTERM ends every process of the server; the group kill is for a server that hangs
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
