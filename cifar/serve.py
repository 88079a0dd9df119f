"""`serve`: a checkpoint's model over HTTP with LitServe. `POST /predict` takes images and answers their top
classes; `GET /ui` is a web page to try it; `/`, `/health` and `/info` are LitServe's own.

The model is the one `predict` and `export` run: uint8 images resized to 32x32 as `predict` reads files,
normalized, with the checkpoint's test-time augmentation, softmax. LitServe batches requests (up to
`max_batch_size`, waiting at most `batch_timeout` s for more), so many clients share one forward pass.

Bad input gets a 4xx answer with a one-line JSON error (`{"error": "..."}`), and only the request that sent it:
each request is read, checked and decoded to pixels as it arrives, before LitServe queues it, so a batch holds
only good requests. Uploads stay in memory (LitServe keeps Starlette from spooling them to disk); nothing a
client sends is written to disk or used as a path.
"""

import base64
import binascii
import os
import signal
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from torch import Tensor

try:  # optional: pip install -e ".[serve]"
    import litserve as ls
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:
    ls = Request = None

from cifar.errors import UserError
from cifar.module import LitModel, Probabilities
from cifar.readers import IMAGE_SIZE, decode

FIELD = "images"  # multipart: one or more files in this field; JSON: {"images": ["<base64>", ...]}
MAX_REQUEST_BYTES = 8 * 2**20  # a larger request is answered 413 (LitServe's max_payload_size)
PAGE = Path(__file__).with_name("serve.html")


def images_of(body, max_images: int) -> Tensor:
    """The images of a request body, multipart form data (field `images`) or JSON (`{"images": [base64]}`), as
    uint8 pixels (N, 3, 32, 32); HTTPException (4xx, a one-line reason) when they are not good input."""
    if isinstance(body, dict):  # JSON
        items = body.get(FIELD)
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise HTTPException(422, f'send JSON {{"{FIELD}": ["<base64 PNG or JPEG>", ...]}}')
        try:
            blobs = [base64.b64decode(item, validate=True) for item in items]
        except (binascii.Error, ValueError):
            raise HTTPException(422, f'"{FIELD}" must hold base64-encoded PNG or JPEG files') from None
    else:  # multipart form data (Starlette's FormData)
        unknown = sorted(set(body.keys()) - {FIELD})
        if unknown:
            raise HTTPException(422, f"unknown form field {unknown[0]!r}: send the image files in the field {FIELD!r}")
        files = body.getlist(FIELD)
        if not files or any(isinstance(file, str) for file in files):
            raise HTTPException(422, f"send one or more image files in the multipart field {FIELD!r}")
        blobs = [file.file.read() for file in files]
    if len(blobs) > max_images:
        raise HTTPException(413, f"{len(blobs)} images in one request: at most {max_images}")
    images = torch.empty(len(blobs), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for i, blob in enumerate(blobs):
        if not blob:
            raise HTTPException(400, f"image {i + 1} of {len(blobs)} is empty")
        try:
            images[i] = decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        except RuntimeError:
            raise HTTPException(415, f"image {i + 1} of {len(blobs)} is not a whole PNG or JPEG image") from None
    return images


async def pixels(request: Request) -> np.ndarray:
    """A POST /predict request's images as uint8 pixels (N, 3, 32, 32), from its multipart form data or JSON object;
    any other body is answered 400. Decoding runs in a thread: it holds up no other request."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await request.form()
    else:
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # empty, not JSON, not UTF-8, nested too deep
            body = None
        if not isinstance(body, dict):
            form = f'multipart form data (files in the field "{FIELD}")'
            raise HTTPException(400, f'send {form} or a JSON object {{"{FIELD}": [...]}}')
    return (await run_in_threadpool(images_of, body, request.app.state.max_images)).numpy()


# LitServe makes `decode_request`'s annotation the type of POST /predict's parameter, so FastAPI runs `pixels` on
# each request as it arrives and answers bad input there. It must not reach a batch: LitServe's batched loop decodes
# a whole batch in one `try` and answers every request in it with any one's exception. NumPy, not a tensor, crosses
# LitServe's request queue: torch would pickle a tensor into shared memory.
Pixels = Annotated[np.ndarray, Depends(pixels)] if ls else np.ndarray


def one_line_error(request, error):
    """Every HTTP error, LitServe's too (413 for a request over its max_payload_size), as `{"error": "<detail>"}`."""
    return JSONResponse({"error": error.detail}, error.status_code, headers=error.headers)


class ClassifierAPI(ls.LitAPI if ls else object):
    def __init__(self, model: LitModel, top: int, max_batch_size: int, batch_timeout: float, precision="32-true"):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model = Probabilities(model.classifier).eval().requires_grad_(False)  # to each worker, read once
        self.classes, self.top, self.precision = model.classes, top, precision

    def setup(self, device: str) -> None:
        self.model, self.device = self.model.to(device), device

    def decode_request(self, request: Pixels) -> Tensor:
        return torch.from_numpy(request)

    def batch(self, inputs: list[Tensor]) -> tuple[Tensor, list[int]]:
        """The images of every request in the batch as one tensor, and how many each request sent."""
        return torch.cat(inputs), [len(x) for x in inputs]

    @torch.inference_mode()
    def predict(self, x: Tensor | tuple[Tensor, list[int]]):
        images, sizes = x if isinstance(x, tuple) else (x, None)  # a batch, or one request (max_batch_size 1)
        device = torch.device(self.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            probs = self.model(images.to(device)).float().cpu()
        return probs if sizes is None else (probs, sizes)

    def unbatch(self, output: tuple[Tensor, list[int]]) -> list[Tensor]:
        probs, sizes = output
        return list(probs.split(sizes))

    def encode_response(self, output: Tensor):
        top = output.topk(min(self.top, len(self.classes)), dim=-1)
        return {"predictions": [[{"class": self.classes[c], "probability": round(p, 6)} for p, c in zip(ps, cs)]
                                for ps, cs in zip(top.values.tolist(), top.indices.tolist())]}  # fmt: skip


def stop_as_ctrl_c(main_pid: int):
    """A SIGTERM handler for the main process: LitServe shuts its worker and server processes down only on
    KeyboardInterrupt (Ctrl-C), and would leave them running when its main process is terminated. The processes
    it forks inherit the handler; they end as SIGTERM ends them by default."""

    def handler(signum, frame) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    return handler


def serve(
    model: LitModel,
    ckpt_path: Path,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    top: int = 3,
    max_images: int = 16,
    max_batch_size: int = 64,
    batch_timeout: float = 0.005,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
) -> None:
    """Serve a checkpoint's model over HTTP: a web page at /ui, POST /predict, /health, /info. Ctrl-C stops it.

    Args:
        model: The checkpoint's model, rebuilt (`cifar.cli.run_tool`).
        ckpt_path: Its checkpoint's path.
        host: The interface to listen on: 127.0.0.1 (this machine only), or 0.0.0.0 / :: (every interface:
            anyone who can reach this machine can use the model).
        port: The TCP port.
        top: Classes answered per image, most probable first.
        max_images: Images one request may send; more are answered 413. A request is also limited to 8 MiB.
        max_batch_size: Requests LitServe runs as one batch; 1 turns batching off.
        batch_timeout: Seconds LitServe waits for more requests to fill a batch.
        precision: As the config's `trainer.precision` for `predict`: `bf16-mixed` (configs/fast.yaml) runs the
            network under bf16 autocast, faster on CPUs and GPUs with bf16 units, as `predict` does with it.
    """
    if ls is None:
        raise UserError('serve needs LitServe: pip install -e ".[serve]"')

    path, classes = ckpt_path, model.classes
    info = {"checkpoint": str(path), "net": type(model.net).__name__, "classes": classes, "input": "PNG or JPEG, any size, resized to 32x32",
            "tta": model.classifier.tta, "precision": precision, "top": top, "max_images": max_images,
            "max_request_bytes": MAX_REQUEST_BYTES}  # fmt: skip
    api = ClassifierAPI(model, top, max_batch_size, batch_timeout, precision)
    server = ls.LitServer(api, accelerator="auto", max_payload_size=MAX_REQUEST_BYTES, model_metadata=info)
    server.app.state.max_images = max_images  # for `pixels`
    server.app.add_exception_handler(StarletteHTTPException, one_line_error)
    server.app.add_api_route("/ui", lambda: HTMLResponse(PAGE.read_text()), methods=["GET"], include_in_schema=False)
    signal.signal(signal.SIGTERM, stop_as_ctrl_c(os.getpid()))
    print(f"Serving {path} ({len(classes)} classes): the page at http://{host}:{port}/ui, POST /predict; Ctrl-C stops")
    server.run(host=host, port=port, generate_client_file=False)
