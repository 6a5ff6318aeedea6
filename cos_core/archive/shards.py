"""A shard's identity and content checksum: the safetensors metadata every shard carries (schema version, its sample
index, the sample's row, capture's layout, the checksum) and the checksum itself, a sha256 over every tensor's name,
dtype, shape and bytes in name order, so it does not depend on the order safetensors wrote the header in (which
differs between processes). The writer computes it from the arrays, the reader from the file, streaming.
Imports numpy and `schema` only: never the reader, writer or safetensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, BinaryIO, Mapping

import numpy as np

from .schema import ArchiveError

DIGEST = "sha256"
META_SAMPLE, META_ROW, META_DIGEST = "sample", "row", "content_sha256"  # safetensors metadata keys
CHUNK = 8 * 2**20
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
          "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}
DTYPES = {code: name for name, code in _CODES.items()} | {"BF16": "bfloat16"}  # safetensors code -> numpy name


def _start(h: "hashlib._Hash", name: str, dtype: str, shape: list[int]) -> None:
    h.update(json.dumps([name, dtype, [int(n) for n in shape]]).encode() + b"\n")


def array_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """The content checksum of the tensors a shard is about to hold (`write_sample`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        code = _CODES.get(value.dtype.name)
        assert code is not None, f"no safetensors dtype for {name} ({value.dtype})"
        _start(h, name, code, list(value.shape))
        h.update(memoryview(value.reshape(-1).view(np.uint8)))
    return f"{DIGEST}:{h.hexdigest()}"


def file_digest(f: BinaryIO) -> str:
    """The content checksum of the safetensors file open in `f` (whose header safetensors has already accepted),
    read in chunks: memory stays at one chunk whatever the shard's size."""
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        _start(h, name, info["dtype"], info["shape"])
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        left = end - start
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ArchiveError(f"{getattr(f, 'name', 'shard')}: tensor {name!r} is cut short")
            h.update(chunk)
            left -= len(chunk)
    return f"{DIGEST}:{h.hexdigest()}"


def is_digest(value: Any) -> bool:
    head, _, hexa = value.partition(":") if isinstance(value, str) else ("", "", "")
    return head == DIGEST and len(hexa) == 64 and all(c in "0123456789abcdef" for c in hexa)


def shard_row(meta: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    """The sample row a shard's metadata carries (ArchiveError when it is absent or damaged)."""
    try:
        row = json.loads((meta or {})[META_ROW])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ArchiveError(f"{where} carries no readable sample row in its metadata (not a cos-lab shard, or "
                           "damaged)") from None
    if not isinstance(row, dict):
        raise ArchiveError(f"{where}: its metadata row is not an object")
    return row


def check_identity(meta: Mapping[str, str] | None, sample: int, sample_id: Any, where: str) -> None:
    """The shard at position `sample` must say it is that sample (index, when it records one, and sample id): a
    shard swapped with another of the run, or copied in from another run, is refused instead of read as this one."""
    said = (meta or {}).get(META_SAMPLE)
    if said is not None and said != str(sample):
        raise ArchiveError(f"{where} holds sample {said!r}, not sample {sample}: shards were swapped or copied; "
                           "re-capture the run (or put each shard back under its own name)")
    if sample_id is None:
        return
    row = shard_row(meta, where)
    if row.get("sample_id") != sample_id:
        raise ArchiveError(f"{where} holds sample_id {row.get('sample_id')!r}, samples.parquet says {sample_id!r} "
                           f"for sample {sample}: shards were swapped or copied between runs; re-capture the run")
