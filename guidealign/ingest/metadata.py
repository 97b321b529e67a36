"""Metadata JSON for ingest: a row's other fields as one JSON string, written the same way by
the row-by-row path (``meta_json``) and the columnar one (``metadata_column``), and a rejected
row's record for its quarantine row (``raw_repr``).

Keys are sorted at every level, so a row's key order does not matter. Columns whose type
``pyarrow.json`` inferred give their values back only when ``writes_as_read`` says so; for the
other rows (``rows_to_write_by_row``) the caller writes metadata from the row reader's record.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guidealign.ingest.arrays import affix, bool_numpy, lit, one_array, str_arrow
from guidealign.shards.jsonl import finite

_JSON_ESCAPE_RE2 = r'[\x00-\x1f\\"]'

# Values nested deeper than this are not written: ``json`` (and ``dumps``, ``repr``) recurse once a
# level on the caller's stack, so how deep a row could go depended on the stack it was read on
# (a row ~980 levels deep killed the job from one path and was quarantined from another). A row
# with a deeper value is quarantined (``too_deep``), on every path. JSON can nest this deep; a
# Parquet file or a saved dataset cannot (their readers stop at ~100 schema levels and at 64),
# an Arrow table in memory can (``batch.table_batch`` sends such a block row by row).
MAX_DEPTH = 500


def too_deep(v, limit: int = MAX_DEPTH) -> bool:
    """``v`` (a record's value: dicts, lists and tuples of scalars) holds containers nested more
    than ``limit`` levels (``[]`` is one level). Iterative: no recursion, whatever the depth."""
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = x.values()
        elif not isinstance(x, (list, tuple)):
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in x if isinstance(c, (dict, list, tuple)))
    return False


def type_depth(t: pa.DataType) -> int:
    """How many levels of containers a value of Arrow type ``t`` can hold, as Python values
    (``to_pylist``) count them for ``too_deep``: a list or a struct one level, a map two (a list of
    pairs). Iterative: no recursion, whatever the depth."""
    best, stack = 0, [(t, 0)]
    while stack:
        t, d = stack.pop()
        best = max(best, d)
        if pa.types.is_map(t):
            stack += [(t.key_type, d + 2), (t.item_type, d + 2)]
        elif pa.types.is_struct(t) or pa.types.is_union(t):
            stack += [(t.field(i).type, d + 1) for i in range(t.num_fields)]
        elif pa.types.is_dictionary(t):
            stack.append((t.value_type, d))
        elif isinstance(t, pa.ExtensionType):
            stack.append((t.storage_type, d))
        elif hasattr(t, "value_type"):  # list, large list, fixed-size list, list view
            stack.append((t.value_type, d + 1))
    return best


def dumps(v) -> str:
    """``v`` as JSON: keys sorted at every level (so a row's key order does not matter), text as
    is; \\u escapes only where UTF-8 cannot hold a character (a lone surrogate, e.g. from a
    \\ud800 escape or an undecodable byte in a binary column). Only those characters are escaped
    (not the rest of the row's text), so a row's JSON is its values' JSON joined, whether
    written whole (``meta_json``) or value by value (``metadata_column``).

    Strict JSON: a float that is not finite (NaN, a Parquet inf, JSONL ``NaN``/``Infinity`` or
    ``1e99999``) is written as ``null``, as exported JSONL writes it (``shards.jsonl``; JSON has
    no such number, and the bare ``NaN``/``Infinity`` Python's json would write are refused by
    jq, JavaScript and most other readers). The key stays: ``{"score": null}`` for a NaN score,
    where a missing or null value leaves the key out (``meta_json``, ``metadata_column``)."""
    try:
        s = json.dumps(v, ensure_ascii=False, default=_as_text, sort_keys=True, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere (rare)
        s = json.dumps(finite(v), ensure_ascii=False, default=_as_text, sort_keys=True, allow_nan=False)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            # a surrogate is only ever inside a JSON string here: "\\udcff" is its JSON escape,
            # exactly as ensure_ascii writes it
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _as_text(v) -> str:
    """A value JSON has no type for: bytes (a binary value inside a list or struct) as a binary
    column's are (its text; a byte that is not UTF-8 as a lone surrogate, escaped by ``dumps``),
    anything else (a date, a decimal) as ``str`` writes it."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="surrogateescape")
    return str(v)


def meta_json(rec: dict, key) -> str:
    """The row's other non-null fields as a JSON object (``dumps``)."""
    meta = {k: v for k, v in rec.items() if k != key and v is not None}
    return dumps(meta) if meta else "{}"


def raw_repr(rec) -> str | None:
    if rec is None:
        return None
    if isinstance(rec, dict) and set(rec) == {"_raw"}:
        return _visible(rec["_raw"][:2000])
    if too_deep(rec, MAX_DEPTH + 1):  # the record is one level: its values as deep as they may be
        return f"<a {type(rec).__name__} nested too deeply to show (deeper than {MAX_DEPTH} levels)>"
    try:
        s = json.dumps(rec, ensure_ascii=False, default=_as_text)
    except Exception:  # noqa: BLE001 - e.g. nested past the recursion limit
        try:
            s = repr(rec)
        except RecursionError:
            s = f"<a {type(rec).__name__} nested too deeply to show>"
    return _visible(s[:2000])


def _visible(s: str) -> str:
    """``s`` with each lone surrogate (an undecodable byte, kept) written as its escape,
    ``\\udcff``, as ``dumps`` writes it in metadata: the bytes stay visible."""
    return s if s.isascii() else s.encode("utf-8", "backslashreplace").decode("utf-8")


def py_values(arr: pa.Array) -> list:
    """``arr.to_pylist()``, where one value Python cannot hold does not stop the rest: text with
    invalid UTF-8 (Parquet readers do not check it) decoded as binary is (``decode_bytes``: each
    bad byte a lone surrogate, which ``dumps`` writes as a \\udcXX escape), and a value out of
    Python's range (a date past year 9999, a huge duration) as the text ``<TYPE out of range:
    VALUE>``, VALUE as Arrow stores it (``<timestamp[s] out of range: 1700000000000>``: seconds
    since 1970). Values at any depth; the row reader reads them the same way."""
    try:
        return arr.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):  # rare: value by value
        return [_py(arr[i]) for i in range(len(arr))]


def py_records(table) -> list[dict]:
    """``table.to_pylist()`` (a Table or a RecordBatch), its values read as ``py_values`` does."""
    try:
        return table.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):
        cols = [py_values(one_array(c) if isinstance(c, pa.ChunkedArray) else c) for c in table.columns]
        return [dict(zip(table.column_names, vals)) for vals in zip(*cols)]


def _py(s: pa.Scalar):
    try:
        return s.as_py()
    except (ValueError, OverflowError, pa.ArrowException):
        pass
    t = s.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return s.as_buffer().to_pybytes().decode("utf-8", errors="surrogateescape")
    if pa.types.is_struct(t):
        return {t.field(i).name: _py(s[i]) for i in range(t.num_fields)}
    if pa.types.is_map(t):  # as as_py gives a map: a list of (key, value)
        return [(_py(kv[0]), _py(kv[1])) for kv in s.values]
    if isinstance(s, (pa.DictionaryScalar, pa.UnionScalar, pa.ExtensionScalar)):
        return _py(s.value)
    if isinstance(getattr(s, "values", None), pa.Array):  # a list of any kind
        return [_py(v) for v in s.values]
    return f"<{t} out of range: {getattr(s, 'value', '?')}>"


def _json_values(arr: pa.Array) -> pa.Array:
    """Each value as ``dumps`` writes it (binary as the row reader decodes it); null stays null."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if not pc.any(pc.match_substring_regex(arr, _JSON_ESCAPE_RE2)).as_py():
            return affix(arr.cast(pa.string()), '"', '"')
    elif pa.types.is_integer(t):
        return arr.cast(pa.string())
    elif pa.types.is_boolean(t):
        return pc.if_else(arr, lit("true"), lit("false"))
    elif pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    vals = py_values(arr)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        vals = [None if v is None else v.decode("utf-8", errors="surrogateescape") for v in vals]
    return str_arrow([None if v is None else dumps(v) for v in vals])


def writes_as_read(t: pa.DataType) -> bool:
    """Whether a column whose type was inferred from JSON (``pyarrow.json``) gives each value
    back as the row reader read it: strings, integers, booleans, nulls and lists of them do. A
    float column may hold numbers written as integers (1 read back as 1.0), and a struct column
    fills in as null the keys a row left out."""
    while pa.types.is_list(t) or pa.types.is_large_list(t):  # a loop: a list may be nested deeply
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_boolean(t) or pa.types.is_null(t))


def rows_to_write_by_row(table: pa.Table, skip: str) -> np.ndarray:
    """Rows whose metadata the columns of a JSON-inferred ``table`` may not give back as the row
    reader read it: every row when a column is neither ``writes_as_read`` nor a float, else the
    rows where a float column holds a whole number (written as 1 or as 1.0: only the row knows)."""
    n = table.num_rows
    mask = np.zeros(n, dtype=bool)
    for f in table.schema:
        if f.name == skip or writes_as_read(f.type):
            continue
        if not pa.types.is_floating(f.type):
            return np.ones(n, dtype=bool)
        col = one_array(table.column(f.name))
        mask |= bool_numpy(pc.fill_null(pc.equal(col, pc.floor(col)), lit(False)))
    return mask


def metadata_column(table: pa.Table, skip: str) -> pa.Array:
    """The other columns as a JSON object per row, null values left out, keys sorted (as
    ``meta_json``).

    One column (the usual case): '{"k": ' v '}', or '{}' where v is null. More: each column's
    ', "k": v' (or '' where null), joined, the first ', ' replaced by '{', then '}'."""
    names = sorted(c for c in table.column_names if c != skip)
    if not names:
        return str_arrow(["{}"] * table.num_rows)
    cols = [(json.dumps(name, ensure_ascii=False) + ": ", _json_values(one_array(table.column(name))))
            for name in names]
    if len(cols) == 1:
        key, vals = cols[0]
        out = affix(vals, "{" + key, "}")
        return pc.fill_null(out, lit("{}")) if vals.null_count else out
    pieces = [affix(vals, ", " + key) for key, vals in cols]
    pieces = [pc.fill_null(p, lit("")) if p.null_count else p for p in pieces]
    joined = pc.binary_join_element_wise(*pieces, lit(""))
    return affix(pc.utf8_slice_codeunits(joined, 2), "{", "}")
