"""`serve`: a checkpoint's model over HTTP with LitServe. `POST /predict` takes images and answers their top
classes; `GET /` is a web page to try it; `/health` and `/info` are LitServe's own.

The model is the one `predict` and `export` run: uint8 images resized to 32x32 as `predict` reads files,
normalized, with the checkpoint's test-time augmentation, softmax. LitServe batches requests (up to
`max_batch_size`, waiting at most `batch_timeout` s for more), so many clients share one forward pass.

Bad input gets a 4xx answer with a one-line JSON error (`{"error": "..."}`), and only the request that sent it:
LitServe fails a whole batch when `decode_request` raises, so it never raises; it returns the rejection, which
`encode_response` answers. Nothing a client sends is written to disk or used as a path.
"""

import base64
import binascii
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

try:  # optional: pip install -e ".[serve]"
    import litserve as ls
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.formparsers import MultiPartParser
except ImportError:
    ls = None

from cifar.datasets import IMAGE_SIZE, decode
from cifar.errors import UserError
from cifar.export import Probabilities, load_model
from cifar.runs import resolve_checkpoint

FIELD = "images"  # multipart: one or more files in this field; JSON: {"images": ["<base64>", ...]}
MAX_REQUEST_BYTES = 8 * 2**20  # a larger request is answered 413 (LitServe's max_payload_size)
PAGE = Path(__file__).with_name("serve.html")

if ls is not None:
    # Starlette spools an uploaded file over 1 MB to a temporary file on disk; a request here is at most
    # MAX_REQUEST_BYTES, so keep every upload in memory: nothing a client sends is written to disk.
    MultiPartParser.spool_max_size = MAX_REQUEST_BYTES


@dataclass
class Rejected:
    """A request that cannot be answered with predictions: its HTTP status and one-line reason."""

    status: int
    error: str


class CheckedBody:
    """ASGI middleware for POST /predict: a body that is not multipart form data and not a JSON object is
    answered here, 400 with a one-line JSON error (LitServe would answer 500)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if content_type.startswith("multipart/form-data"):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while not messages or messages[-1].get("more_body", False):
            messages.append(await receive())
            body += messages[-1].get("body", b"")
        try:
            valid = isinstance(json.loads(body), dict)
        except ValueError:
            valid = False
        if not valid:
            error = f'send multipart form data (files in the field "{FIELD}") or a JSON object {{"{FIELD}": [...]}}'
            return await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
        replay = iter(messages)

        async def replayed():  # the body read above, then the connection's own messages (a disconnect)
            return next(replay, None) or await receive()

        return await self.app(scope, replayed, send)


def images_of(request, max_images: int) -> list[bytes] | Rejected:
    """The encoded images of a request: multipart form data (field `images`) or JSON (`{"images": [base64]}`)."""
    if isinstance(request, dict):  # JSON
        items = request.get(FIELD)
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            return Rejected(422, f'send JSON {{"{FIELD}": ["<base64 PNG or JPEG>", ...]}}')
        try:
            blobs = [base64.b64decode(item, validate=True) for item in items]
        except (binascii.Error, ValueError):
            return Rejected(422, f'"{FIELD}" must hold base64-encoded PNG or JPEG files')
    else:  # multipart form data (Starlette's FormData)
        unknown = sorted(set(request.keys()) - {FIELD})
        if unknown:
            return Rejected(422, f"unknown form field {unknown[0]!r}: send the image files in the field {FIELD!r}")
        files = request.getlist(FIELD)
        if not files or isinstance(files[0], str):
            return Rejected(422, f"send one or more image files in the multipart field {FIELD!r}")
        blobs = [file.file.read() for file in files]
    if len(blobs) > max_images:
        return Rejected(413, f"{len(blobs)} images in one request: at most {max_images}")
    return blobs


class ClassifierAPI(ls.LitAPI if ls else object):
    def __init__(self, ckpt_path: Path, top: int, max_images: int, max_batch_size: int, batch_timeout: float,
                 precision: str = "32-true"):  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top, self.max_images, self.precision = ckpt_path, top, max_images, precision

    def setup(self, device: str) -> None:
        model, self.classes = load_model(self.ckpt_path)
        self.model = Probabilities(model).eval().requires_grad_(False).to(device)
        self.device = device

    def decode_request(self, request) -> Tensor | Rejected:
        blobs = images_of(request, self.max_images)
        if isinstance(blobs, Rejected):
            return blobs
        images = torch.empty(len(blobs), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for i, blob in enumerate(blobs):
            if not blob:
                return Rejected(400, f"image {i + 1} of {len(blobs)} is empty")
            try:
                images[i] = decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            except RuntimeError:
                return Rejected(415, f"image {i + 1} of {len(blobs)} is not a whole PNG or JPEG image")
        return images

    def batch(self, inputs: list) -> tuple[Tensor | None, list]:
        """The images of every request in the batch as one tensor; the rejected requests keep their place."""
        images = [x for x in inputs if isinstance(x, Tensor)]
        return (torch.cat(images) if images else None), [len(x) if isinstance(x, Tensor) else x for x in inputs]

    @torch.inference_mode()
    def predict(self, x):
        if not isinstance(x, tuple):  # unbatched (max_batch_size 1): one request's images or its rejection
            return self.unbatch(self.predict(self.batch([x])))[0]
        images, parts = x
        device = torch.device(self.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            probs = self.model(images.to(device)).float().cpu() if images is not None else None
        return probs, parts

    def unbatch(self, output) -> list:
        probs, parts = output
        sizes = [p for p in parts if isinstance(p, int)]
        pieces = iter(probs.split(sizes) if sizes else [])
        return [next(pieces) if isinstance(p, int) else p for p in parts]

    def encode_response(self, output):
        if isinstance(output, Rejected):
            return JSONResponse({"error": output.error}, status_code=output.status)
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
    ckpt_path: str,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    root: str = "runs/cifar",
    top: int = 3,
    max_images: int = 16,
    max_batch_size: int = 64,
    batch_timeout: float = 0.005,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
) -> None:
    """Serve a checkpoint's model over HTTP: a web page at /, POST /predict, /health, /info. Ctrl-C stops it.

    Args:
        ckpt_path: The checkpoint: `best` or `last` (of the latest run under `root`), or a .ckpt path.
        host: The interface to listen on: 127.0.0.1 (this machine only), or 0.0.0.0 / :: (every interface:
            anyone who can reach this machine can use the model).
        port: The TCP port.
        root: Where `best` and `last` look (the `trainer.default_root_dir` of the config that trained it).
        top: Classes answered per image, most probable first.
        max_images: Images one request may send; more are answered 413. A request is also limited to 8 MiB.
        max_batch_size: Requests LitServe runs as one batch; 1 turns batching off.
        batch_timeout: Seconds LitServe waits for more requests to fill a batch.
        precision: As the config's `trainer.precision` for `predict`: `bf16-mixed` (configs/fast.yaml) runs the
            network under bf16 autocast, faster on CPUs and GPUs with bf16 units, as `predict` does with it.
    """
    if ls is None:
        raise UserError('serve needs LitServe: pip install -e ".[serve]"')

    path = resolve_checkpoint(ckpt_path, Path(root))
    model, classes = load_model(path)  # here too: a bad checkpoint is one error line, before the server starts
    info = {"checkpoint": str(path), "net": type(model.net).__name__, "classes": classes, "input": "PNG or JPEG, any size, resized to 32x32",
            "tta": model.tta, "precision": precision, "top": top, "max_images": max_images,
            "max_request_bytes": MAX_REQUEST_BYTES}  # fmt: skip
    api = ClassifierAPI(path, top, max_images, max_batch_size, batch_timeout, precision)
    server = ls.LitServer(api, accelerator="auto", max_payload_size=MAX_REQUEST_BYTES, model_metadata=info,
                          middlewares=[CheckedBody])  # fmt: skip
    server.app.add_api_route("/", lambda: HTMLResponse(PAGE.read_text()), methods=["GET"], include_in_schema=False)
    # LitServe answers GET / itself ("litserve running"); the first route that matches wins, so ours goes first.
    server.app.router.routes.insert(0, server.app.router.routes.pop())
    signal.signal(signal.SIGTERM, stop_as_ctrl_c(os.getpid()))
    print(f"Serving {path} ({len(classes)} classes) at http://{host}:{port}/ (POST /predict; Ctrl-C stops)")
    server.run(host=host, port=port, generate_client_file=False)
