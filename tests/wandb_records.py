"""Read the records of an offline W&B run file (`run-<id>.wandb`), to check what a run logged.

The file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by LevelDB-log framing:
32 KiB blocks of chunks, each with a 7-byte header (CRC32, little-endian length, type: 1 full,
2 first, 3 middle, 4 last). Each reassembled payload is a serialized `wandb_internal_pb2.Record`.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """Each `wandb.log` call as {key: decoded value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def updates(path: Path, kind: str) -> dict:
    """The run's `kind` ("config" or "summary") as updated over the run, {key: decoded value}."""
    values = {}
    for record in records(path):
        found = record.WhichOneof("record_type")
        if found == kind:
            items = getattr(record, kind).update
        elif found == "run" and kind == "config":  # the run record carries the config given at start
            items = record.run.config.update
        else:
            continue
        for item in items:
            values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def config(path: Path) -> dict:
    """The run config as updated over the run (the run record's, then config records), {key: decoded value}."""
    return updates(path, "config")


def summary(path: Path) -> dict:
    """The run summary as updated over the run, {key: decoded value}."""
    return updates(path, "summary")


def table(path: Path, row: dict, key: str) -> dict:
    """The table a history row logged under `key`, as W&B saved it: {"columns": [...], "data": [[...], ...]}."""
    assert row[f"{key}/_type"] == "table-file", row
    return json.loads((Path(path).parent / "files" / row[f"{key}/path"]).read_text())


def artifacts(path: Path) -> list[tuple[str, str, list[str]]]:
    """(name, type, paths of its files) of each artifact the run logged; W&B stores a table's images in one."""
    return [(r.artifact.name, r.artifact.type, [e.path for e in r.artifact.manifest.contents])
            for r in records(path) if r.WhichOneof("record_type") == "artifact"]  # fmt: skip


def tags(path: Path) -> list[str]:
    """The run's tags, as last set."""
    found = []
    for record in records(path):
        if record.WhichOneof("record_type") == "run" and record.run.tags:
            found = list(record.run.tags)
    return found


def group(path: Path) -> str:
    """The run's group, as last set."""
    found = ""
    for record in records(path):
        if record.WhichOneof("record_type") == "run" and record.run.run_group:
            found = record.run.run_group
    return found
