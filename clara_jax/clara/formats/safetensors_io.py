"""A small reader and writer of the safetensors format with bfloat16 support (ml_dtypes).

Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Reading memory-maps the file and returns one tensor
at a time, so converting a 7B model holds about one copy of the weights, not two.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """Lazy access to one .safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._offset = 8 + size
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mm[self._offset + start:self._offset + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def open_dir(model_dir: str) -> dict[str, SafetensorsFile]:
    """{tensor name: the file holding it} for a single-file or sharded (index.json) directory."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {fn: SafetensorsFile(os.path.join(model_dir, fn))
                 for fn in sorted(set(weight_map.values()))}
        return {name: files[fn] for name, fn in weight_map.items()}
    paths = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    if not paths:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file")
    out = {}
    for p in paths:
        f = SafetensorsFile(os.path.join(model_dir, p))
        for name in f.names():
            out[name] = f
    return out


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Writes tensors (numpy, bfloat16 allowed) to one .safetensors file."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be stored")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def save_sharded(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str,
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes (name, array) pairs into model-0000i-of-0000n.safetensors shards of at most
    max_shard_bytes each (one shard: model.safetensors) plus the HF index; returns files."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"))
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fn))
        names.append(fn)
        for name, arr in shard.items():
            weight_map[name] = fn
            total += arr.nbytes
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
