"""Columnar ingest: check, normalize and hash a whole block of rows at once.

A ``Batch`` is one block of input rows in input order: the candidate rows (prompt, line
number, metadata JSON, 64-bit hash) and the rejected ones with their reasons. Three ways in:

- ``ingest_jsonl.jsonl_blocks``: a JSONL stream cut into blocks at line ends and parsed by
  ``pyarrow.json``; a block that does not parse as a whole (a bad line, a column whose type
  changes) goes through the row-by-row reader instead, so its quarantine reasons are exact;
- ``table_batch``: an Arrow table (a JSONL block, a Parquet/`datasets` batch);
- ``rows_batch``: records from a row-by-row reader (CSV, JSON arrays, fallbacks).

The id is exactly ``ingest.prompt_hash``: blake2b-64 of NFKC + whitespace-collapsed text. For
pure-ASCII prompts NFKC is the identity, so the columnar path only collapses whitespace (the
same ASCII characters Python's ``\\s`` matches) with one RE2 pass and hashes the bytes; prompts
with any non-ASCII character are normalized by Python's own ``unicodedata``, so ids never
depend on which path a row took.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guidealign.core.ids import normalize, prompt_hash
from guidealign.ingest.readers import find_prompt_key, norm_key

# a run of Python's \s restricted to ASCII, matched only where it is not already one space
# (a run starting with another whitespace char, or a space followed by more): one RE2 pass that
# leaves single spaces alone is ~8x faster than rewriting every space
_WS = r"[\t\n\x0b\x0c\r\x1c-\x1f ]"
ASCII_WS_RE2 = r"[\t\n\x0b\x0c\r\x1c-\x1f]" + _WS + "*| " + _WS + "+"
_JSON_ESCAPE_RE2 = r'[\x00-\x1f\\"]'
_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


@dataclass
class Batch:
    src: str
    n_in: int = 0                               # input rows (blank lines not counted)
    prompt: pa.Array | None = None              # candidate rows, input order
    lineno: np.ndarray | None = None            # int64
    metadata: pa.Array | None = None            # JSON strings
    hashes: np.ndarray | None = None            # uint64 (little-endian blake2b-64)
    pos: np.ndarray | None = None               # index of each candidate among the n_in rows
    at: np.ndarray | None = None                # index of each candidate in prompt/metadata
    bad_pos: list = field(default_factory=list)
    bad_row: list = field(default_factory=list)
    bad_reason: list = field(default_factory=list)
    bad_raw: list = field(default_factory=list)

    def reject(self, pos: int, row: int, reason: str, raw) -> None:
        self.bad_pos.append(pos)
        self.bad_row.append(row)
        self.bad_reason.append(reason)
        self.bad_raw.append(raw)


@dataclass
class Spec:
    field: str
    aliases: tuple
    max_chars: int
    compiled_hash: bool = False  # use the numba blake2b kernel for ASCII prompts


# --- per-row checks (the reference semantics) --------------------------------------------------

def check_value(p, key, spec: Spec) -> str | None:
    if key is None:
        return f"missing prompt field {spec.field!r}"
    if p is None:
        return "null prompt"
    if not isinstance(p, str):
        return f"prompt is not a string ({type(p).__name__})"
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid UTF-8 in the prompt; re-save the file as UTF-8 or pass --encoding"
    if not p.strip():
        return "empty prompt"
    if len(p) > spec.max_chars:
        return f"prompt too long ({len(p)} > {spec.max_chars} chars)"
    return None


def meta_json(rec: dict, key) -> str:
    meta = {k: v for k, v in rec.items() if k != key and v is not None}
    return json.dumps(meta, ensure_ascii=False, default=str) if meta else "{}"


def raw_repr(rec) -> str | None:
    if rec is None:
        return None
    if isinstance(rec, dict) and set(rec) == {"_raw"}:
        return rec["_raw"][:2000]
    try:
        s = json.dumps(rec, ensure_ascii=False, default=str)
    except Exception:  # noqa: BLE001
        s = repr(rec)
    return s[:2000].encode("utf-8", "replace").decode("utf-8")


def rows_batch(src: str, rows: Iterable[tuple[int, dict | None, str | None]], spec: Spec) -> Batch:
    """Row-by-row: each (row number, record, reader error) checked, normalized and hashed."""
    b = Batch(src)
    prompts, linenos, metas, hashes, pos = [], [], [], [], []
    keys_cache: dict = {}
    for i, (row_no, rec, err) in enumerate(rows):
        b.n_in += 1
        key = None
        if err is None:
            ks = tuple(rec)
            key = keys_cache.get(ks, 0)
            if key == 0:
                key = keys_cache[ks] = find_prompt_key(ks, spec.field, spec.aliases)
            err = check_value(rec.get(key) if key is not None else None, key, spec)
        if err is not None:
            b.reject(i, row_no, err, raw_repr(rec))
            continue
        p = rec[key]
        prompts.append(p)
        linenos.append(row_no)
        metas.append(meta_json(rec, key))
        hashes.append(prompt_hash(p))
        pos.append(i)
    b.prompt = pa.array(prompts, type=pa.string())
    b.lineno = np.array(linenos, dtype=np.int64)
    b.metadata = pa.array(metas, type=pa.string())
    b.hashes = np.frombuffer(b"".join(hashes), dtype="<u8").astype(np.uint64) if hashes \
        else np.empty(0, np.uint64)
    b.pos = np.array(pos, dtype=np.int64)
    b.at = np.arange(len(pos), dtype=np.int64)
    return b


# --- columnar ----------------------------------------------------------------------------------

def hash_ascii(arr: pa.Array, compiled: bool = False) -> np.ndarray:
    """blake2b-64 of each string's bytes: hashlib in a loop (no str objects), or with
    ``compiled`` the numba kernel (same digests, all cores, no GIL) when numba is installed."""
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    _, offs, data = arr.buffers()
    o = np.frombuffer(offs, dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    if compiled and _numba_kernel() is not None:
        buf = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
        return _numba_kernel()(o, buf)
    o = o.tolist()
    mv = memoryview(data) if data is not None else memoryview(b"")
    b2 = hashlib.blake2b
    out = b"".join([b2(mv[o[i]:o[i + 1]], digest_size=8).digest() for i in range(len(arr))])
    return np.frombuffer(out, dtype="<u8").astype(np.uint64)


_KERNEL: list = []


def _numba_kernel():
    if not _KERNEL:
        try:
            from guidealign.ingest.blake2_numba import blake2b64
        except ImportError:
            blake2b64 = None
        _KERNEL.append(blake2b64)
    return _KERNEL[0]


def hex_ids(h: np.ndarray) -> pa.Array:
    """16-char hex of each hash's little-endian bytes (== ``prompt_hash(p).hex()``)."""
    n = len(h)
    digits = _HEX[h.astype("<u8").view(np.uint8)].tobytes()
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 16).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(digits)])


def _json_values(arr: pa.Array) -> pa.Array:
    """Each value as json.dumps(v, ensure_ascii=False) would write it; null stays null."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if not pc.any(pc.match_substring_regex(arr, _JSON_ESCAPE_RE2)).as_py():
            return pc.binary_join_element_wise('"', arr.cast(pa.string()), '"', "")
    elif pa.types.is_integer(t):
        return arr.cast(pa.string())
    elif pa.types.is_boolean(t):
        return pc.if_else(arr, "true", "false")
    elif pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    vals = [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in arr.to_pylist()]
    return pa.array(vals, type=pa.string())


def metadata_column(table: pa.Table, skip: str) -> pa.Array:
    """The other columns as a JSON object per row, null values left out (as ``meta_json``)."""
    frags = []
    for name in table.column_names:
        if name == skip:
            continue
        col = table.column(name).combine_chunks()
        head = ", " + json.dumps(name, ensure_ascii=False) + ": "
        frags.append(pc.fill_null(pc.binary_join_element_wise(head, _json_values(col), ""), ""))
    if not frags:
        return pa.array(["{}"] * table.num_rows, type=pa.string()) if table.num_rows else pa.array([], pa.string())
    joined = frags[0] if len(frags) == 1 else pc.binary_join_element_wise(*frags, "")
    return pc.binary_join_element_wise("{", pc.utf8_slice_codeunits(joined, 2), "}", "")


def table_batch(src: str, table: pa.Table, linenos: np.ndarray, spec: Spec,
                fallback: Callable[[int], tuple[dict | None, str | None]], all_ascii: bool = False,
                no_ws_runs: bool = False) -> Batch:
    """Columnar checks/normalize/hash of ``table``; rows it cannot settle go through ``fallback(i)``
    (the row-by-row reading of row i), so their reasons and values are the reference ones."""
    n = table.num_rows
    names = table.column_names
    key = find_prompt_key(names, spec.field, spec.aliases)
    same = [c for c in names if key is not None and norm_key(c) == norm_key(key)]
    col = table.column(key).combine_chunks() if key is not None else None
    if col is None or len(same) > 1 or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return rows_batch(src, ((int(linenos[i]),) + fallback(i) for i in range(n)), spec)

    good = np.zeros(n, dtype=bool)
    hashes = np.zeros(n, dtype=np.uint64)
    bad: dict[int, tuple[str, object]] = {}
    override: dict[int, tuple[str, str]] = {}  # fallback rows that are good: (prompt, metadata)

    valid = col.is_valid()
    ascii_ = valid if all_ascii else pc.and_(valid, pc.fill_null(pc.string_is_ascii(col), False))
    ascii_np = ascii_.to_numpy(zero_copy_only=False)
    valid_np = valid.to_numpy(zero_copy_only=False)

    # pure ASCII: NFKC is the identity; collapse whitespace, strip, check, hash
    idx = np.flatnonzero(ascii_np)
    if len(idx):
        a = col if len(idx) == n else col.filter(ascii_)
        normed = pc.utf8_trim(a if no_ws_runs else pc.replace_substring_regex(a, ASCII_WS_RE2, " "), " ")
        nlen = pc.binary_length(normed).to_numpy(zero_copy_only=False)
        alen = pc.binary_length(a).to_numpy(zero_copy_only=False)
        ok = (nlen > 0) & (alen <= spec.max_chars)
        for j in np.flatnonzero(~ok):
            bad[int(idx[j])] = ("empty prompt" if nlen[j] == 0 else
                                f"prompt too long ({int(alen[j])} > {spec.max_chars} chars)", None)
        good[idx[ok]] = True
        hashes[idx[ok]] = hash_ascii(normed if ok.all() else normed.filter(pa.array(ok)),
                                      spec.compiled_hash)

    # other strings: Python's own NFKC, per row
    idx = np.flatnonzero(valid_np & ~ascii_np)
    if len(idx):
        for i, p in zip(idx.tolist(), col.take(pa.array(idx)).to_pylist()):
            err = check_value(p, key, spec)
            if err is None:
                good[i] = True
                hashes[i] = int.from_bytes(prompt_hash(p), "little")
            else:
                bad[i] = (err, None)

    # null or missing prompt: the row reader decides (another spelling, an alias, or a reason)
    for i in np.flatnonzero(~valid_np).tolist():
        rec, err = fallback(i)
        k = None
        if err is None:
            k = find_prompt_key(tuple(rec), spec.field, spec.aliases)
            err = check_value(rec.get(k) if k is not None else None, k, spec)
        if err is None:
            good[i] = True
            hashes[i] = int.from_bytes(prompt_hash(rec[k]), "little")
            override[i] = (rec[k], meta_json(rec, k))
        else:
            bad[i] = (err, rec)

    b = Batch(src, n_in=n)
    pos = np.flatnonzero(good)
    b.pos = b.at = pos.astype(np.int64)
    b.hashes = hashes[pos]
    b.lineno = np.asarray(linenos, dtype=np.int64)[pos]
    b.prompt, b.metadata = col.cast(pa.string()), metadata_column(table, key)
    if override:  # rare: rows whose prompt came from the row reader
        pl, ml = b.prompt.to_pylist(), b.metadata.to_pylist()
        for i, (p, m) in override.items():
            pl[i], ml[i] = p, m
        b.prompt, b.metadata = pa.array(pl, pa.string()), pa.array(ml, pa.string())
    for i in sorted(bad):
        reason, rec = bad[i]
        raw = raw_repr(rec) if rec is not None else raw_repr(_row_dict(table, i))
        b.reject(i, int(linenos[i]), reason, raw)
    return b


def _row_dict(table: pa.Table, i: int) -> dict:
    return table.slice(i, 1).to_pylist()[0]


def arrow_batches(src: str, batches: Iterable, spec: Spec) -> Iterator[Batch]:
    """Parquet / `datasets` record batches -> Batches (row numbers from 1)."""
    from guidealign.ingest.readers import decode_bytes

    start = 1
    for rb in batches:
        table = pa.Table.from_batches([rb]) if isinstance(rb, pa.RecordBatch) else rb
        n = table.num_rows
        linenos = np.arange(start, start + n, dtype=np.int64)

        def fallback(i, table=table):
            return decode_bytes(_row_dict(table, i)), None

        yield table_batch(src, table, linenos, spec, fallback)
        start += n


__all__ = ["Batch", "Spec", "rows_batch", "table_batch", "arrow_batches", "hex_ids", "hash_ascii",
           "normalize"]
