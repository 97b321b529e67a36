"""A string column's bytes as spans, and their hashes: what ingest's checks and ids read
without making a Python string of each prompt."""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from guidealign.ingest.blake2_llvm import blake2b64_spans, kernel as blake2_kernel

_EMPTY = pa.py_buffer(b"\0")


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, pa.Buffer | None]:
    """(offsets as int64 numpy, data buffer) of a string/large_string array."""
    _, offs, data = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    o = np.frombuffer(offs, dtype=width)[arr.offset:arr.offset + len(arr) + 1] if len(arr) else np.zeros(1, width)
    return o.astype(np.int64), data


def hash_spans(starts: np.ndarray, ends: np.ndarray, data: pa.Buffer | None, kernel: str = "hashlib") -> np.ndarray:
    """blake2b-64 of each byte span ``data[starts[i]:ends[i]]``: hashlib in a loop (no str
    objects), or a compiled kernel (``llvm``: blake2_llvm; the same digests, without the GIL)."""
    if kernel == "llvm" and blake2_kernel() is not None:
        keep = data if data is not None and data.size else _EMPTY  # alive during the call
        return blake2b64_spans(starts, ends, keep.address)
    mv = memoryview(data) if data is not None else memoryview(b"")
    b2 = hashlib.blake2b
    out = b"".join([b2(mv[i:j], digest_size=8).digest() for i, j in zip(starts.tolist(), ends.tolist())])
    return np.frombuffer(out, dtype="<u8").astype(np.uint64)


class Ahead(NamedTuple):
    """A block's prompt column normalized and hashed beside the caller (``jsonl.hashes_ahead``)."""
    key: str
    starts: np.ndarray
    ends: np.ndarray
    data: pa.Buffer | None
    hashes: np.ndarray


def trimmed_spans(a: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Buffer | None]:
    """(starts, ends, data) of the strings of ``a`` without a leading and a trailing space, for
    strings whose only whitespace is single spaces (after the collapsing pass, or where the
    block has no other): the normalized prompt's bytes, without copying any."""
    o, data = string_buffers(a)
    starts, ends = o[:-1].copy(), o[1:].copy()
    if data is None or not len(a):
        return starts, ends, data
    buf = np.frombuffer(data, dtype=np.uint8)
    nz = np.flatnonzero(ends > starts)
    lead = nz[buf[starts[nz]] == 32]
    starts[lead] += 1
    nz = np.flatnonzero(ends > starts)
    trail = nz[buf[ends[nz] - 1] == 32]
    ends[trail] -= 1
    return starts, ends, data

