"""Columnar ingest: check, normalize and hash a whole block of rows at once.

A ``Batch`` is one block of input rows in input order: the candidate rows (prompt, line
number, metadata JSON, 64-bit hash) and the rejected ones with their reasons. Three ways in:

- ``jsonl.jsonl_blocks`` / ``csvcol.csv_batches``: a JSONL or CSV stream cut into blocks at
  line (record) ends and parsed by ``pyarrow.json`` / ``pyarrow.csv``; a block that does not
  parse as a whole (a bad line, a column whose type changes, a ragged row, quoting the two CSV
  parsers may read differently) goes through the row-by-row reader instead, so its quarantine
  reasons are exact;
- ``table_batch``: an Arrow table (a JSONL or CSV block, a Parquet/`datasets` batch);
- ``rows_batch``: records from a row-by-row reader (JSON arrays, fallbacks).

The id is exactly ``ingest.prompt_hash``: blake2b-64 of NFKC + whitespace-collapsed text. For
pure-ASCII prompts NFKC is the identity, so the columnar path only collapses whitespace (the
same ASCII characters Python's ``\\s`` matches) with one RE2 pass (none when the block cannot
hold a whitespace run) and hashes the bytes between the first and last non-space (byte spans
into the Arrow buffer, no copy; ``blake2_llvm``: compiled, without the GIL);
prompts with any non-ASCII character are normalized by Python's own ``unicodedata``, so ids
never depend on which path a row took. Metadata is written by ``metadata`` (the same JSON
either way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guidealign.core.ids import normalize, prompt_hash
from guidealign.ingest.chat import NO_CHAT, ChatKey, chat_key, chat_prompt, chat_reason, chat_turns
from guidealign.ingest.arrays import bool_numpy, int_arrow, lit, one_array, str_arrow
from guidealign.ingest.spans import Ahead, hash_spans, string_buffers, trimmed_spans  # noqa: F401 - re-exported
from guidealign.ingest.shard_table import Later
from guidealign.ingest.metadata import (MAX_DEPTH, meta_json, metadata_column, py_records, raw_repr,
                                        rows_to_write_by_row, too_deep, type_depth)
from guidealign.ingest.keys import find_input_keys, find_prompt_key, norm_key
from guidealign.ingest.visible import NO_TEXT, TEXT_RE2, ascii_spans_without_text, has_text

# a run of Python's \s restricted to ASCII, matched only where it is not already one space
# (a run starting with another whitespace char, or a space followed by more): one RE2 pass that
# leaves single spaces alone is ~8x faster than rewriting every space
_WS = r"[\t\n\x0b\x0c\r\x1c-\x1f ]"
ASCII_WS_RE2 = r"[\t\n\x0b\x0c\r\x1c-\x1f]" + _WS + "*| " + _WS + "+"


@dataclass
class Batch:
    src: str
    n_in: int = 0                               # input rows (blank lines not counted)
    prompt: pa.Array | None = None              # candidate rows, input order
    lineno: np.ndarray | None = None            # int64
    # JSON strings, or ``Later`` (made by the shard encoders, once, off the caller's thread)
    metadata: "pa.Array | Later | None" = None
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
    # how ASCII prompts are hashed: "hashlib" (a Python loop), or "llvm" (blake2_llvm)
    hash_kernel: str = "hashlib"
    # fields whose text joins an ``instruction`` prompt (``ingest.instruction_inputs``)
    inputs: tuple = ()


# an input joins its instruction when both hold text (``visible``: more than blank space, control
# and format characters; one table of code points for Python's regex and Arrow's RE2, as their
# ideas of whitespace differ past ASCII)
INPUT_TEXT_RE = TEXT_RE2
INPUT_SEP = "\n\n"


def with_input(p, values):
    """The prompt of an instruction ``p`` whose record's input fields hold ``values`` (in the
    order of ``ingest.instruction_inputs``): joined by a blank line with the first that holds
    text (Alpaca's instruction + input), else ``p`` alone (so is an instruction without text:
    an empty prompt, not its input alone)."""
    if isinstance(p, str) and has_text(p):
        for v in values:
            if isinstance(v, str) and has_text(v):
                return p + INPUT_SEP + v
    return p


def prompt_keys(keys, spec: Spec) -> tuple[str | None, tuple[str, ...]]:
    """(the key of a record's prompt, the keys of the inputs it is joined with) for a record
    with ``keys``. A record with neither the prompt field nor an alias may hold its prompt as a
    chat conversation (``chat``: ``messages``, ``conversations``; a ``ChatKey``)."""
    key = find_prompt_key(keys, spec.field, spec.aliases)
    if key is None:
        key = chat_key(keys)
    return key, find_input_keys(keys, key, spec.inputs)


def prompt_value(rec: dict, key: str | None, ikeys: tuple[str, ...]):
    """The prompt of ``rec`` under its :func:`prompt_keys`: the instruction with its input joined,
    the user turn of a conversation of one (``chat.chat_prompt``); ``chat.NO_CHAT`` when the
    key is a chat field whose value is no conversation."""
    p = rec.get(key) if key is not None else None
    if isinstance(key, ChatKey) and chat_turns(p) is None:
        return NO_CHAT
    if isinstance(p, list):
        return chat_prompt(p)
    return with_input(p, [rec.get(k) for k in ikeys]) if ikeys else p


def meta_key(rec: dict, key):
    """The field left out of a kept row's metadata: its prompt's, but for a conversation (a list
    there), kept whole: its other turns are in no other column."""
    return None if isinstance(rec.get(key), list) else key


# --- per-row checks (the reference semantics) --------------------------------------------------

def check_value(p, key, spec: Spec, fields=()) -> str | None:
    """Why ``p`` (the value of ``key`` in a row with keys ``fields``) is no prompt, or None."""
    if key is None or p is NO_CHAT:
        return missing_field(spec, fields)
    if p is None:
        return "null prompt"
    if isinstance(p, list) and (turns := chat_turns(p)) is not None:
        return chat_reason(turns)
    if not isinstance(p, str):
        return f"prompt is not a string ({type(p).__name__})"
    try:
        p.encode("utf-8")
    except UnicodeEncodeError as e:
        # U+DC80-U+DCFF: a byte that was not UTF-8 (read with surrogateescape; a rare \udcXX
        # escape reads the same); any other lone surrogate came from a \u escape in valid text
        # (JSON's "\ud83d"), which no re-save fixes
        c = ord(p[e.start])
        if 0xDC80 <= c <= 0xDCFF:
            return "invalid UTF-8 in the prompt; re-save the file as UTF-8 or pass --encoding"
        return (f"unpaired surrogate escape in the prompt (\\u{c:04x} is half of a character, not one); "
                "fix the escape or drop it")
    if not p.strip():
        return "empty prompt"
    if not has_text(p):  # zero-width spaces, control characters: nothing to read either
        return NO_TEXT
    if len(p) > spec.max_chars:
        return f"prompt too long ({len(p)} > {spec.max_chars} chars)"
    return None


def missing_field(spec: Spec, fields) -> str:
    """The reason for a row without the prompt field or any of its aliases (``fields``: its keys)."""
    names = [str(k) for k in fields][:8]
    more = ", ..." if len(fields) > 8 else ""
    tried = " or ".join(repr(n) for n in (spec.field, *spec.aliases))
    return (f"missing prompt field {spec.field!r} (tried {tried}; the row has "
            f"{', '.join(names) + more if names else 'no fields'}): --set ingest.prompt_field=NAME "
            "names the prompt's")


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
            keys = keys_cache.get(ks)
            if keys is None:
                keys = keys_cache[ks] = prompt_keys(ks, spec)
            key = keys[0]
            p = prompt_value(rec, *keys)
            err = check_value(p, key, spec, ks)
        if err is not None:
            b.reject(i, row_no, err, raw_repr(rec))
            continue
        key = meta_key(rec, key)
        try:
            meta = meta_json(rec, key)
        except RecursionError:  # json.loads read it with the stack to spare, dumps needs more
            meta = None
        # deeper than MAX_DEPTH: quarantined whatever the stack (a JSON text has at least as many
        # brackets as levels, so most rows are cleared by a count)
        if meta is None or meta.count("[") + meta.count("{") > MAX_DEPTH:
            if any(too_deep(v) for k, v in rec.items() if k != key):
                b.reject(i, row_no, f"row {row_no} has a value nested too deeply to write as JSON "
                                    f"(deeper than {MAX_DEPTH} levels)", raw_repr(rec))
                continue
            if meta is None:
                b.reject(i, row_no, f"row {row_no} has a value nested too deeply to write as JSON", raw_repr(rec))
                continue
        prompts.append(p)
        linenos.append(row_no)
        metas.append(meta)
        hashes.append(prompt_hash(p))
        pos.append(i)
    b.prompt = str_arrow(prompts)
    b.lineno = np.array(linenos, dtype=np.int64)
    b.metadata = str_arrow(metas)
    b.hashes = np.frombuffer(b"".join(hashes), dtype="<u8").astype(np.uint64) if hashes \
        else np.empty(0, np.uint64)
    b.pos = np.array(pos, dtype=np.int64)
    b.at = np.arange(len(pos), dtype=np.int64)
    return b


# --- columnar ----------------------------------------------------------------------------------

def table_batch(src: str, table: pa.Table, linenos: np.ndarray, spec: Spec,
                fallback: Callable[[int], tuple[dict | None, str | None]], all_ascii: bool = False,
                no_ws_runs: bool = False, inferred_types: bool = False, ahead: Ahead | None = None) -> Batch:
    """Columnar checks/normalize/hash of ``table``; rows it cannot settle go through ``fallback(i)``
    (the row-by-row reading of row i), so their reasons and values are the reference ones, as
    are the records shown for rejected rows. ``inferred_types``: the column types were inferred
    from JSON, so metadata is written from the columns only when ``writes_as_read`` says each
    value comes back as the row reader read it, and row by row otherwise. ``ahead``: the
    prompt column's spans and hashes made beforehand (``hashes_ahead``), taken where every row
    is an ASCII string with single spaces only."""
    n = table.num_rows
    names = table.column_names
    key, ikeys = prompt_keys(names, spec)
    same = [c for c in names if key is not None and norm_key(c) == norm_key(key)]
    col = one_array(table.column(key)) if key is not None else None
    # (a chat field: each row's value decides whether it is a conversation, and which turn)
    if col is None or isinstance(key, ChatKey) or len(same) > 1 \
            or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) \
            or any(type_depth(t) > MAX_DEPTH for t in table.schema.types):
        # (a column that may be nested deeper than rows are written: each row checked by the
        # row reader's rules, without recursing over the type or the values on this stack)
        return rows_batch(src, ((int(linenos[i]),) + fallback(i) for i in range(n)), spec)

    good = np.zeros(n, dtype=bool)
    hashes = np.zeros(n, dtype=np.uint64)
    bad: dict[int, tuple[str, object]] = {}
    override: dict[int, tuple[str, str]] = {}  # fallback rows that are good: (prompt, metadata)

    inputs = [one_array(table.column(k)) for k in ikeys]
    if ikeys and (any(_text_elsewhere(a.type) for a in inputs) or _spelt_twice(names, spec.inputs)):
        # an input column of dictionary, binary or view type (a pandas categorical, bytes that
        # are not all UTF-8), or one input name in two spellings: the row reader joins them
        return rows_batch(src, ((int(linenos[i]),) + fallback(i) for i in range(n)), spec)
    if ikeys:
        col, joined = _join_input(col, inputs)
        no_ws_runs = no_ws_runs and not joined  # the blank line between them is a whitespace run

    valid = col.is_valid()
    ascii_ = valid if all_ascii else pc.and_(valid, pc.fill_null(pc.string_is_ascii(col), lit(False)))
    ascii_np, valid_np = bool_numpy(ascii_), bool_numpy(valid)

    # pure ASCII: NFKC is the identity; collapse whitespace, strip, check, hash
    idx = np.flatnonzero(ascii_np)
    if len(idx):
        a = col if len(idx) == n else col.filter(ascii_)
        if ahead is not None and not (ahead.key == key and no_ws_runs and len(idx) == n and not ikeys):
            ahead = None
        if ahead is not None:
            starts, ends, data = ahead.starts, ahead.ends, ahead.data
        else:
            starts, ends, data = trimmed_spans(a if no_ws_runs else pc.replace_substring_regex(a, ASCII_WS_RE2, " "))
        nlen = ends - starts
        alen = np.diff(string_buffers(a)[0])
        blank = ascii_spans_without_text(starts, ends, data, controls=not no_ws_runs)
        ok = (nlen > 0) & ~blank & (alen <= spec.max_chars)
        if not ok.all():
            for j in np.flatnonzero(~ok):
                bad[int(idx[j])] = ("empty prompt" if nlen[j] == 0 else NO_TEXT if blank[j] else
                                    f"prompt too long ({int(alen[j])} > {spec.max_chars} chars)", None)
        good[idx[ok]] = True
        if ahead is not None:
            hashes[idx[ok]] = ahead.hashes[ok]
        else:
            if not ok.all():
                starts, ends = starts[ok], ends[ok]
            hashes[idx[ok]] = hash_spans(starts, ends, data, spec.hash_kernel)

    # other strings: Python's own NFKC, per row
    idx = np.flatnonzero(valid_np & ~ascii_np)
    if len(idx):
        for i, p in zip(idx.tolist(), col.take(int_arrow(idx)).to_pylist()):
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
            k, iks = prompt_keys(tuple(rec), spec)
            p = prompt_value(rec, k, iks)
            err = check_value(p, k, spec, tuple(rec))
        if err is None:
            good[i] = True
            hashes[i] = int.from_bytes(prompt_hash(p), "little")
            override[i] = (p, meta_json(rec, meta_key(rec, k)))
        else:
            bad[i] = (err, rec)

    b = Batch(src, n_in=n)
    pos = np.flatnonzero(good)
    b.pos = b.at = pos.astype(np.int64)
    b.hashes = hashes[pos]
    b.lineno = np.asarray(linenos, dtype=np.int64)[pos]
    b.prompt = col.cast(pa.string())
    # metadata only the row reader writes exactly: rows whose prompt came from it, and (columns
    # whose types were inferred from JSON) rows the columns may not give back as read
    meta = {i: m for i, (_, m) in override.items()}
    if inferred_types:
        for i in np.flatnonzero(rows_to_write_by_row(table, key) & good).tolist():
            if i not in meta:
                meta[i] = meta_json(fallback(i)[0], key)
    if len(meta) == len(pos):  # every kept row: the columns are not needed at all
        b.metadata = str_arrow([meta.get(i) for i in range(n)])
    elif not meta:
        b.metadata = Later(lambda: metadata_column(table, key))
    else:  # some rows written by the row reader, the rest from the columns
        ml = metadata_column(table, key).to_pylist()
        for i, m in meta.items():
            ml[i] = m
        b.metadata = str_arrow(ml)
    if override:  # rare: rows whose prompt came from the row reader
        pl = b.prompt.to_pylist()
        for i, (p, _) in override.items():
            pl[i] = p
        b.prompt = str_arrow(pl)
    for i in sorted(bad):  # shown as the row reader reads them (not with the block's other columns)
        reason, rec = bad[i]
        b.reject(i, int(linenos[i]), reason, raw_repr(rec if rec is not None else fallback(i)[0]))
    return b


def _text_elsewhere(t: pa.DataType) -> bool:
    """A column type that is not string/large_string yet may hold text a row reader joins."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return False
    textless = (pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating,
                pa.types.is_decimal, pa.types.is_temporal, pa.types.is_list, pa.types.is_large_list,
                pa.types.is_struct, pa.types.is_map)
    return not any(f(t) for f in textless)


def _spelt_twice(names: list[str], inputs) -> bool:
    """Whether an input field's name comes in two spellings among the columns ("input" and
    "Input": each row takes its own, one column per spelling)."""
    wanted = {norm_key(i) for i in inputs}
    seen = [norm_key(n) for n in names if norm_key(n) in wanted]
    return len(seen) != len(set(seen))


def _join_input(col: pa.Array, inputs: list[pa.Array]) -> tuple[pa.Array, bool]:
    """(the prompts with their inputs joined as :func:`with_input` joins them, whether any was):
    each row whose instruction holds text takes the first input column that does in that row."""
    big = pa.large_string()
    out, joined = col.cast(big), False
    # rows without text in their instruction keep it as it is (an empty prompt stays one)
    taken = pc.invert(pc.fill_null(pc.match_substring_regex(col, INPUT_TEXT_RE), lit(False)))
    for inp in inputs:
        if not (pa.types.is_string(inp.type) or pa.types.is_large_string(inp.type)):
            continue  # no text in it (numbers, nulls): the row reader joins none either
        has = pc.and_(pc.fill_null(pc.match_substring_regex(inp, INPUT_TEXT_RE), lit(False)),
                      pc.invert(taken))
        if not pc.any(has).as_py():
            continue
        both = pc.binary_join_element_wise(col.cast(big), inp.cast(big), pa.scalar(INPUT_SEP, big))
        out = pc.if_else(has, both, out)
        taken = pc.or_(taken, has)
        joined = True
    return (out if joined else col), joined


def _row_dict(table: pa.Table, i: int) -> dict:
    return py_records(table.slice(i, 1))[0]


def arrow_batches(src: str, batches: Iterable, spec: Spec) -> Iterator[Batch]:
    """Parquet / `datasets` record batches -> Batches (row numbers from 1)."""
    from guidealign.ingest.arrowfiles import UnreadRows, decode_bytes, text_as_binary

    start = 1
    for rb in batches:
        if isinstance(rb, UnreadRows):  # rows that cannot be decoded: a quarantine entry each
            yield rows_batch(src, rb.rows(), spec)
            start += rb.n
            continue
        table = text_as_binary(pa.Table.from_batches([rb]) if isinstance(rb, pa.RecordBatch) else rb)
        n = table.num_rows
        linenos = np.arange(start, start + n, dtype=np.int64)

        def fallback(i, table=table):
            return decode_bytes(_row_dict(table, i)), None

        yield table_batch(src, table, linenos, spec, fallback)
        start += n


__all__ = ["Batch", "Spec", "rows_batch", "table_batch", "arrow_batches", "hash_spans",
           "normalize"]
