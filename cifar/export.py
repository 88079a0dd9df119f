"""`export`: a checkpoint's model as one file for serving, without Python code of ours.

The exported model takes what a server has, a raw uint8 image batch (N, 3, H, W) in RGB order, and returns
class probabilities (N, classes): the normalization, the model's test-time augmentation (`model.tta`) and
the softmax are baked in, and the batch size is free. The class names travel with it as a JSON list (index =
class): ONNX metadata `classes`; extra file `classes.json` of the torch.export and TorchScript files.

Formats: `onnx` (torch's dynamo-based exporter, for onnxruntime), `torch_export` (a `.pt2` ExportedProgram for
`torch.export.load`), and `torchscript` (deprecated by torch 2.14; kept while `torch.jit.load` reads it).
"""

import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from cifar.errors import UserError, first_line
from cifar.module import LitModel, Probabilities
from cifar.readers import IMAGE_SIZE

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2", "torchscript": ".pt"}
BATCH = torch.export.Dim("N", min=1, max=65536)  # the free batch axis of every format


def export(
    model: LitModel,
    ckpt_path: Path,
    format: Literal["onnx", "torch_export", "torchscript"] = "onnx",
    output: str | None = None,
) -> Path:
    """Export a checkpoint's model for serving: uint8 images in, class probabilities out, class names inside.

    Args:
        model: The checkpoint's model, rebuilt (`cifar.cli.run_tool`).
        ckpt_path: Its checkpoint's path.
        format: `onnx` (for onnxruntime and most servers), `torch_export` (a .pt2 for `torch.export.load`), or
            `torchscript` (deprecated by torch 2.14: use torch_export; for `torch.jit.load` while torch reads it).
        output: The file to write (default: beside the checkpoint, `.onnx`, `.pt2` or `.pt`); never overwritten.

    Returns the path written.
    """
    if format not in FORMATS:
        raise UserError(f"--format {format} is not one of {', '.join(FORMATS)}")
    path = Path(output) if output else ckpt_path.with_suffix(FORMATS[format])
    if path.exists():
        raise UserError(f"{path} already exists: choose another --output or move it away")
    classes, size = model.classes, IMAGE_SIZE  # what predict and serve read every image as
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    served = Probabilities(model.classifier).eval().requires_grad_(False)  # inference only: outputs need no grad
    path.parent.mkdir(parents=True, exist_ok=True)
    # Renamed at the end: never a half-written model file. The suffix stays last: torch.export.save checks it.
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with torch.no_grad():
            EXPORTERS[format](served, example, classes, temporary)
        if path.exists():  # appeared while we exported
            raise UserError(f"{path} already exists: choose another --output or move it away")
        temporary.rename(path)
    finally:
        temporary.unlink(missing_ok=True)
    print(f"Exported {ckpt_path} as {format} to {path}: uint8 images (N, 3, {size}, {size}) -> probabilities "
          f"(N, {len(classes)}), classes {classes}")  # fmt: skip
    return path


def export_onnx(model: nn.Module, example: Tensor, classes: list[str], path: Path) -> None:
    try:
        import onnx  # optional: only ONNX export needs them
        import onnxscript  # noqa: F401  (the dynamo-based exporter writes the graph with it)
    except Exception as error:  # missing, or there but not loading: e.g. protobuf's VersionError, for an onnx
        # built against another protobuf major version than the one Python finds first
        raise UserError(f"ONNX export needs the onnx and onnxscript packages, importable ({type(error).__name__}: "
                        f'{first_line(error)}): pip install -e ".[export]"') from error  # fmt: skip

    # The torch.export-based exporter (the TorchScript-based one, dynamo=False, is deprecated in torch 2.14).
    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["probabilities"],
                      dynamic_shapes={"images": {0: BATCH}}, dynamo=True, verbose=False)  # fmt: skip
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"classes": json.dumps(classes)})
    onnx.save(proto, str(path))


def export_torch_export(model: nn.Module, example: Tensor, classes: list[str], path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: BATCH}})
    torch.export.save(program, str(path), extra_files={"classes.json": json.dumps(classes)})


def export_torchscript(model: nn.Module, example: Tensor, classes: list[str], path: Path) -> None:
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; torch.jit.load still reads it
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(model, example)  # the forward has no data-dependent branches: tracing is exact
        torch.jit.save(traced, str(path), _extra_files={"classes.json": json.dumps(classes)})


EXPORTERS = {"onnx": export_onnx, "torch_export": export_torch_export, "torchscript": export_torchscript}
