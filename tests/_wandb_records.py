"""Reading back what wandb wrote in offline mode (shared by the W&B tests)."""

import json
import struct
import zlib


def records(path):
    """The protobuf `Record`s of a `.wandb` file.

    wandb 0.31 no longer ships a Python reader (`wandb.sdk.internal.datastore` is gone, the
    writer is the Go `wandb-core`), so this is that format: a 7-byte header (":W&B", 0xBEE1,
    version 0), then LevelDB-log chunks in 32 KiB blocks, each `<crc32 u32><len u16><type u8>`
    with type 1 full / 2 first / 3 middle / 4 last, crc32 seeded with the type byte.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path):
    """{step: {top-level key: value}} of the history records, W&B's own `_...` keys left out."""
    rows = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            if keys[0].startswith("_"):
                continue
            row.setdefault(keys[0], {} if len(keys) > 1 else json.loads(item.value_json))
            if len(keys) > 1:
                row[keys[0]][keys[1]] = json.loads(item.value_json)
        rows[record.history.step.num] = row
    return rows


def offline_run(run_dir):
    [run] = run_dir.glob("wandb/offline-run-*")
    [log] = run.glob("run-*.wandb")
    return run, log
