"""A JSONL block of flat objects read into Arrow columns by compiled code, as ``pyarrow.json`` reads it.

``pyarrow.json`` was the largest part of ingest's CPU (~35%): it is a general parser. Most prompt
files are flat: every line one object whose values are strings or integers. For such a block two
small kernels (``flatjson_ir``, built with llvmlite like ``scan_llvm``, called through ctypes,
which releases the GIL) do the work in one pass over the bytes and one copy of the strings:

- ``parse`` checks each line against that shape and records, for each key (in the order keys
  first appear in the block, as ``pyarrow.json`` orders its columns), where each line's value
  lies, or its integer value;
- ``gather`` copies one string column's values into an Arrow string buffer, decoding escapes
  (``\\n``, ``\\uXXXX``, surrogate pairs) to UTF-8.

Anything else gives None and the block goes to ``pyarrow.json`` as before: a value that is not a
string or an integer of at most 18 digits (a float, true/false/null, an object, a list), a key
with an escape, a key twice on one line, a key whose values are strings on one line and
integers on another, more than ``MAX_KEYS`` keys, an escape that does not decode (a lone
surrogate), a control byte in a string, anything around the object. So each table this module
returns is the one ``pyarrow.json`` would (with its date inference undone, as
``jsonl._read_json_block`` does): the tests compare the two on generated blocks, and each build
runs a self-test against ``pyarrow.json`` before it is used.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pyarrow as pa

from guidealign.ingest.flatjson_ir import GATHER, PARSE, TOO_MANY_KEYS
from guidealign.ingest.llvm_build import build, load

MAX_KEYS = (8, 64)  # room for keys a block: first try, then once more with more room
SLOT_BYTES = 17     # the parse's memory a key slot a line (where it starts, ends, an escape flag)
_P = ctypes.c_void_p
_PARSE_T = ctypes.CFUNCTYPE(ctypes.c_int64, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P, _P, _P)
_GATHER_T = ctypes.CFUNCTYPE(ctypes.c_int64, _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P, _P)


def _build():
    """(engine, (parse, gather)) as compiled, not yet checked: the engine owns their code (keep
    it alive while they are called)."""
    from guidealign.ingest import flatjson_ir

    ee, addrs = build(flatjson_ir.module, Path(flatjson_ir.__file__), [PARSE, GATHER], optimize=True)
    return ee, (_PARSE_T(addrs[PARSE]), _GATHER_T(addrs[GATHER]))


def kernels():
    """(parse, gather), built on first use, or None when they cannot be had (no llvmlite; a
    build or self-test that failed, said once as a warning): pyarrow.json reads then."""
    return load("flat JSON", lambda: _build(), _self_test, "parsing with pyarrow.json")


def line_spans(n: int, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the lines of a block of ``n`` bytes whose line ends are ``ends``."""
    starts = np.concatenate([np.zeros(1, np.int64), ends + 1])
    stops = np.concatenate([ends, np.array([n], np.int64)])
    if starts[-1] >= n:  # the block ends at a line end: no line after it
        starts, stops = starts[:-1], stops[:-1]
    return starts, stops


def flat_table(arr: np.ndarray, ends: np.ndarray, fns=None) -> pa.Table | None:
    """The table ``pyarrow.json`` reads from the block ``arr`` (uint8, contiguous; UTF-8, checked
    by the caller) with line ends ``ends``, when every line is a flat object of strings and
    integers; else None. Blank lines make it None too (the caller sends such blocks on)."""
    fns = fns or kernels()
    n = arr.size
    if fns is None or n == 0 or n >= 2**31:  # (Arrow strings: 32-bit offsets)
        return None
    parse, gather = fns
    starts, stops = line_spans(n, ends)
    nlines = starts.size
    # the slots take at most 8 times the block's size, or 1 MiB (a 4 MiB block of 8-byte lines
    # has room for 3 keys, ~27 MiB of slots, not 64, ~570 MiB; a block with more keys goes to
    # pyarrow.json)
    room = max(1, 8 * n // (SLOT_BYTES * nlines), (1 << 20) // (SLOT_BYTES * nlines))
    for kmax in sorted({min(k, room) for k in MAX_KEYS}):
        keys = np.zeros(2 * kmax, np.int64)
        kinds = np.zeros(kmax, np.uint8)
        vstart = np.empty(nlines * kmax, np.int64)
        vval = np.empty(nlines * kmax, np.int64)
        esc = np.zeros(nlines * kmax, np.uint8)
        nkeys = np.zeros(1, np.int64)
        rc = parse(arr.ctypes.data, starts.ctypes.data, stops.ctypes.data, nlines, kmax, keys.ctypes.data,
                   kinds.ctypes.data, vstart.ctypes.data, vval.ctypes.data, esc.ctypes.data, nkeys.ctypes.data)
        if rc != TOO_MANY_KEYS:
            break
    if rc != 0:
        return None
    vstart, vval = vstart.reshape(nlines, kmax), vval.reshape(nlines, kmax)
    names, columns = [], []
    for c in range(int(nkeys[0])):
        names.append(arr[keys[2 * c]:keys[2 * c] + keys[2 * c + 1]].tobytes().decode("utf-8"))
        present = vstart[:, c] >= 0
        n_null = nlines - int(np.count_nonzero(present))
        validity = pa.py_buffer(np.packbits(present, bitorder="little")) if n_null else None
        if kinds[c] == 2:
            vals = vval[:, c] if not n_null else np.where(present, vval[:, c], 0)
            columns.append(pa.Array.from_buffers(pa.int64(), nlines, [validity, pa.py_buffer(np.ascontiguousarray(vals))],
                                                 null_count=n_null))
            continue
        raw_bytes = int((vval[present, c] - vstart[present, c]).sum())  # decoded: as many or fewer
        out = np.empty(max(raw_bytes, 1), np.uint8)
        offsets = np.empty(nlines + 1, np.int32)
        size = gather(arr.ctypes.data, vstart.ctypes.data, vval.ctypes.data, esc.ctypes.data, nlines, kmax, c,
                      out.ctypes.data, offsets.ctypes.data)
        if size < 0:
            return None
        columns.append(pa.Array.from_buffers(pa.string(), nlines, [validity, pa.py_buffer(offsets),
                                                                  pa.py_buffer(out[:size])], null_count=n_null))
    if not columns:
        return None
    return pa.Table.from_arrays(columns, names=names)


# lines the self-test reads both ways: escapes of every kind, keys missing and in other orders,
# integers at their limits, non-ASCII text
_SELF_TEST = (
    '{"prompt": "a \\"quoted\\" line\\nand a tab\\t\\u00e9\\ud83d\\ude00\\/", "n": 0, "tag": "x"}\n'
    '{"n": -123456789012345678, "prompt":"caf\u00e9 \u4e2d"}\r\n'
    '{ "tag" : "" ,"prompt": "\\\\ back", "extra": 7 }\n'
    '{"prompt": "2024-01-02", "n": 9}'
)


def _self_test(fns) -> None:
    """The kernels must read what pyarrow.json reads, and refuse what is not flat, before they
    read a block."""
    import pyarrow.json as pajson

    def flat(text: str):
        arr = np.frombuffer(text.encode("utf-8"), np.uint8)
        return flat_table(arr, np.flatnonzero(arr == 10), fns)

    ropts = pajson.ReadOptions(use_threads=False)
    popts = pajson.ParseOptions(explicit_schema=pa.schema([("prompt", pa.string())]),
                                unexpected_field_behavior="infer")
    want = pajson.read_json(pa.BufferReader(_SELF_TEST.encode("utf-8")), read_options=ropts, parse_options=popts)
    got = flat(_SELF_TEST)
    if got is None or not got.equals(want.combine_chunks()):
        raise RuntimeError("the compiled JSON kernel does not read what pyarrow.json reads")
    for bad in ('{"prompt": 1.5}', '{"prompt": "a", "prompt": "b"}', '{"prompt": "\\ud800"}',
                '{"prompt": null}', '{"prompt": "a"} x', '{"prompt": 0123}'):
        if flat(bad) is not None:
            raise RuntimeError(f"the compiled JSON kernel took a line it must refuse: {bad}")
