"""JSONL in columnar blocks: cut at line ends, parsed in a background thread.

A block whose lines are all flat objects (string and integer values) is read by compiled code
(``flatjson_llvm``, when the compiled kernels are on) into the table ``pyarrow.json`` would give;
any other block by ``pyarrow.json``. A block whose bytes are not all UTF-8, that ``pyarrow.json`` rejects (a bad line, a column whose
type changes, a duplicate key), whose row count does not match its non-blank lines or that has a
line nested deeper than ``metadata.MAX_DEPTH`` (``has_deep_line``) goes through the row-by-row
reader, so its quarantine reasons are the reference ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from guidealign.ingest.arrays import one_array
from guidealign.ingest.batch import Batch, Spec, prompt_keys, rows_batch, table_batch
from guidealign.ingest.chat import ChatKey
from guidealign.ingest.blocks import BOM, cut_blocks, one_piece, prefetch
from guidealign.ingest.flatjson_llvm import flat_table
from guidealign.ingest.jsonrows import parse_jsonl_line
from guidealign.ingest.keys import norm_key
from guidealign.ingest.llvm_build import loaded
from guidealign.ingest.metadata import MAX_DEPTH
from guidealign.ingest.scan_llvm import kernel as scan_kernel, line_ends
from guidealign.ingest.spans import Ahead, hash_spans, trimmed_spans


def jsonl_blocks(stream, src: str, spec: Spec, encoding: str, block_bytes: int = 4 << 20) -> Iterator[Batch]:
    """Batches of a JSONL byte stream (UTF-8, \\n line ends), ``block_bytes`` at a time.

    One background thread reads and parses the next block (pyarrow releases the GIL) while
    the caller's thread checks, normalizes and hashes this one (a block of ASCII strings with
    single spaces only has its prompts normalized and hashed by the parse thread too:
    ``hashes_ahead``). With the compiled kernels (``spec.hash_kernel`` "llvm") the lines are
    scanned and read by them too, once they are loaded: a block read before then (the first,
    while ingest's kernel thread loads them; more the first time on a machine, while it
    compiles them) goes the numpy and pyarrow.json way instead of waiting, with the same result."""
    compiled = spec.hash_kernel == "llvm"

    def parsed():
        line0 = 1
        for block, final, _ in cut_blocks(stream, block_bytes):
            p = _parse_block(block, line0, final, compiled and loaded("line-end", "flat JSON"))
            if p is not None and p.no_ws_runs and compiled and loaded("blake2b"):
                p = p._replace(ahead=hashes_ahead(p.table, spec))
            yield block, line0, final, p
            line0 += p.ends.size if p is not None else block.count(b"\n")

    for block, line0, final, p in prefetch(parsed()):
        yield _finish_block(block, line0, final, p, src, spec, encoding)


def hashes_ahead(table: pa.Table, spec: Spec) -> Ahead | None:
    """For a block whose strings are all ASCII, with no whitespace but single spaces: its
    prompt column's normalized spans (``trimmed_spans``) and their hashes by the compiled kernel,
    every row's, made by the parse thread so that the caller's thread (the pipeline's
    bottleneck) takes them as they are (``table_batch(ahead=...)``; 1M rows: ~0.1 s of its time).
    None where ``table_batch`` does not take the plain column path. Rows it then rejects (empty,
    no text, too long) were hashed for nothing."""
    names = table.column_names
    key, ikeys = prompt_keys(names, spec)
    if key is None or ikeys or isinstance(key, ChatKey) or sum(norm_key(c) == norm_key(key) for c in names) > 1:
        return None
    col = one_array(table.column(key))
    if not pa.types.is_string(col.type):
        return None
    starts, ends, data = trimmed_spans(col)
    return Ahead(key, starts, ends, data, hash_spans(starts, ends, data, "llvm"))


def _rows_of_lines(block: bytes, line0: int, final: bool, encoding: str):
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
        final_unterminated = False
    else:
        final_unterminated = final
    last = len(lines) - 1
    for k, raw in enumerate(lines):
        row = parse_jsonl_line(line0 + k, raw, final_unterminated and k == last, encoding)
        if row is not None:
            yield row


def _read_json_block(block: bytes) -> pa.Table | None:
    """pyarrow.json, with strings it took for dates read back as the strings they are.

    The block is parsed as one piece in this (the prefetch) thread: no chunks to copy into one
    column after, no thread pool beside the caller's thread (1M rows: 5% less CPU, ~8% faster)."""
    ropts = pajson.ReadOptions(use_threads=False, block_size=one_piece(block))
    table = pajson.read_json(pa.BufferReader(block), read_options=ropts)
    dated = [f for f in table.schema if _is_temporal(f.type)]
    if not dated:
        return table
    if any(not (pa.types.is_timestamp(f.type) or pa.types.is_date(f.type)) for f in dated):
        return None  # a date inside a nested value: the row reader keeps it as written
    popts = pajson.ParseOptions(explicit_schema=pa.schema([(f.name, pa.string()) for f in dated]),
                                unexpected_field_behavior="infer")
    # (the columns given in the schema come first in the table read with it: back in the order
    # of the first read, the order of the keys' first appearance, as ``flatjson_llvm`` gives it)
    return pajson.read_json(pa.BufferReader(block), read_options=ropts,
                            parse_options=popts).select(table.column_names)


def _is_temporal(t: pa.DataType) -> bool:
    return _any_type(t, lambda u: pa.types.is_timestamp(u) or pa.types.is_date(u) or pa.types.is_time(u))


def _any_type(t: pa.DataType | pa.Schema, pred) -> bool:
    """Whether ``t`` (a schema: any of its fields) or a type nested in it satisfies ``pred``."""
    if isinstance(t, pa.Schema):
        return any(_any_type(f.type, pred) for f in t)
    if pred(t):
        return True
    if pa.types.is_struct(t):
        return any(_any_type(t.field(i).type, pred) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _any_type(t.value_type, pred)
    return False


# pyarrow.json also reads -NaN, Inf and -Inf as numbers, which Python's json refuses (it takes NaN,
# Infinity and -Infinity only): looked for as a value (after ":", "[" or ","; in a string such text
# only sends its block to the row reader)
_NOT_PYTHON_NUMBER = re.compile(rb"[:\[,][ \t\r\n]*(?:-NaN|-?Inf)(?=[ \t\r\n,\]}])")


_FIRST_IS_OBJECT = re.compile(rb"[ \t\r\n]*\{")


class _Parsed(NamedTuple):
    """What a block's parse (beside the caller) hands on."""
    table: pa.Table
    linenos: np.ndarray   # the line number of each row
    all_ascii: bool       # every string is ASCII
    no_ws_runs: bool      # no whitespace but single spaces inside a string
    ends: np.ndarray      # the positions of the block's line ends
    ahead: Ahead | None = None  # the prompt column's spans and hashes, where made beside the caller


def _parse_block(block: bytes, line0: int, final: bool, compiled: bool = False) -> _Parsed | None:
    """The part of a block's work that runs beside the caller: None when it must go row by row.
    ``compiled``: the line scan with the compiled kernel (``scan_lines``)."""
    if block.startswith(BOM):  # pyarrow.json skips a BOM at the start of what it parses; Python's
        return None            # json does not (a line of files concatenated): the row reader says so
    if not _FIRST_IS_OBJECT.match(block):  # pyarrow 26's read_json dies (SIGSEGV) on a block whose
        return None                        # first value is `null`; any other non-object fails anyway
    # every string is ASCII when the bytes are and no \\u escape can make a non-ASCII char
    has_escape = b"\\" in block
    all_ascii = block.isascii() and not (has_escape and b"\\u" in block)
    if not all_ascii:
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
    arr = np.frombuffer(block, np.uint8)
    lines = scan_lines(arr, compiled=compiled)
    # (after the scan: its line ends show the long lines, where probing for them took ~1 ms a
    # block with the GIL held)
    if has_deep_line(block, ends=lines.ends):  # pyarrow.json would crawl through it, or die
        return None                            # (SIGSEGV) past ~10k levels
    # every line a flat object of strings and integers: the compiled reader (``flatjson_llvm``)
    # gives the table pyarrow.json would, in a quarter of its time; any other block goes on
    table = flat_table(arr, lines.ends) if compiled else None
    if table is None:
        table = _pyarrow_block(block, arr, lines)
        if table is None:
            return None
    linenos = _nonblank_linenos(block, lines, line0)
    if table.num_rows != len(linenos):  # e.g. two objects on one line: let the row reader say so
        return None
    # A raw control byte inside a JSON string is an error for pyarrow.json (as for Python's
    # json; the tests pin it), so in a block without escapes the only whitespace a string can
    # hold is spaces, and only two in a row (looked for anywhere: a safe superset) need the
    # collapsing pass. One chunk per column (the caller's checks need whole columns): the block
    # is parsed as one (``_read_json_block``), so ``combine_chunks`` copies nothing.
    return _Parsed(table.combine_chunks(), linenos, all_ascii,
                   all_ascii and not has_escape and not lines.double_space, lines.ends)


def _pyarrow_block(block: bytes, arr: np.ndarray, lines: "BlockLines") -> pa.Table | None:
    """The block's table from pyarrow.json, or None where the row reader must read it."""
    # pyarrow.json reads a line end inside a value as blank space: short lines that do not close
    # their values nest on from line to line (a pretty-printed document named .jsonl)
    if not lines.objects and line_depth(block) > MAX_DEPTH:
        return None
    # and it reads two objects on one line as two rows: with a value going on into the next line
    # elsewhere, the row count still matches the lines and rows would pair with other lines' numbers
    if not lines.objects and not lines_hold_whole_objects(arr, lines.ends):
        return None
    try:
        table = _read_json_block(block)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, RecursionError):  # the last: a deep value
        return None
    if table is None:
        return None
    if (_any_type(table.schema, pa.types.is_floating) and (b"Inf" in block or b"-NaN" in block)
            and _NOT_PYTHON_NUMBER.search(block)):
        return None  # a number only pyarrow.json reads (-NaN, Inf): the row reader says it is not JSON
    return table


@dataclass
class BlockLines:
    """What one pass over a JSONL block tells (``scan_lines``)."""
    ends: np.ndarray    # positions of its line ends
    double_space: bool  # two spaces in a row somewhere
    maybe_blank: bool   # some line starts with a byte <= 32 (so may be blank)
    objects: bool       # every line is "{...}" with nothing around it (a CR before its end allowed)


def scan_lines(arr: np.ndarray, step: int = 1 << 16, compiled: bool = False) -> BlockLines:
    """One pass over a block's bytes: the line ends and two spaces in a row (``compiled``: with
    ``scan_llvm``'s kernel when it loads, ~15x as fast; else numpy, ``step`` bytes at a time:
    temporaries of the whole block cost more in page faults than the work); the rest from the
    bytes at the line ends (one gather each).

    ``objects``: when every line starts with "{" and ends with "}", no value goes on from one
    line into the next (after a closing "}" JSON allows only "," "]" "}" or the end, and the
    next line starts with "{"), so nesting starts again at each line and ``has_deep_line``'s
    per-line count is all there is to check. Otherwise (blank lines, indented or pretty-printed
    JSON) ``line_depth`` counts across lines."""
    n = arr.size
    fn = scan_kernel() if compiled else None
    if fn is not None:
        ends, double = line_ends(arr, fn)
    else:
        parts, double = [], False
        for i in range(0, n, step):
            a = arr[i:i + step + 1]  # one byte of overlap for the pairs
            pos = np.flatnonzero(a[:step] == 10)
            if pos.size:
                parts.append(pos + i if i else pos)
            if not double:
                sp = a == 32
                double = bool(np.logical_and(sp[1:], sp[:-1]).any())
        ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    # the line ends a line follows (not the block's last byte: the block ends at a line end or at
    # the file's end)
    inner = ends[:-1] if ends.size and ends[-1] == n - 1 else ends
    after = arr[inner + 1]
    maybe_blank = bool(n) and bool(arr[0] <= 32) or bool((after <= 32).any())
    return BlockLines(ends, double, maybe_blank, _lines_are_objects(arr, inner, after))


def _lines_are_objects(arr: np.ndarray, inner: np.ndarray, after: np.ndarray) -> bool:
    n = arr.size
    if n == 0:
        return True
    if arr[0] != 0x7B:
        return False
    last = n - 1 if arr[-1] == 10 else n
    if last < 1 or arr[last - 1] != 0x7D and not (arr[last - 1] == 13 and last >= 2 and arr[last - 2] == 0x7D):
        return False
    if not inner.size:
        return True
    if not (after == 0x7B).all():
        return False
    before = arr[inner - 1]  # inner >= 1: arr[0] is "{"
    if (before == 0x7D).all():
        return True
    cr = np.flatnonzero(before != 0x7D)
    g = inner[cr]
    return bool((before[cr] == 13).all() and (g >= 2).all() and (arr[g - 2] == 0x7D).all())


# JSON's blank space
_JSON_WS = np.zeros(256, bool)
_JSON_WS[[9, 10, 13, 32]] = True


def lines_hold_whole_objects(arr: np.ndarray, ends: np.ndarray) -> bool:
    """Whether every line of a block that is not blank starts with "{" and ends with "}" once
    JSON's blank space around it is left out (``BlockLines.objects`` without blank lines and
    indentation). As there, no value then goes on from one line into the next (a line ending at
    depth > 0 is followed by a "{", which JSON does not allow), so each line holds whole objects,
    at least one: as many rows as non-blank lines means one object a line, each row its own line's."""
    n = arr.size
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [n]])
    if starts[-1] >= n:  # the block ends at a line end: no line after it
        starts, stops = starts[:-1], stops[:-1]
    first = _past_blank(arr, starts, stops, 1)
    last = _past_blank(arr, stops - 1, starts - 1, -1)
    if first is None or last is None:  # long runs of blank space: one exact pass over the block
        nz = np.flatnonzero(~_JSON_WS[arr])
        if not nz.size:
            return True
        first_i, last_i = np.searchsorted(nz, starts), np.searchsorted(nz, stops) - 1
        full = first_i <= last_i
        first, last = nz[np.minimum(first_i, nz.size - 1)], nz[np.maximum(last_i, 0)]
    else:
        full = first != stops
    return bool((arr[first[full]] == 0x7B).all() and (arr[last[full]] == 0x7D).all())


def _past_blank(arr: np.ndarray, pos: np.ndarray, limit: np.ndarray, step: int, rounds: int = 16):
    """Each position moved ``step`` at a time past JSON's blank space, up to its ``limit`` (where a
    blank line's ends): a few gathers for indentation and a CR; None past ``rounds`` steps."""
    pos = pos.copy()
    todo = np.flatnonzero(pos != limit)
    for _ in range(rounds):
        todo = todo[_JSON_WS[arr[pos[todo]]]]
        if not todo.size:
            return pos
        pos[todo] += step
        todo = todo[pos[todo] != limit[todo]]
    return None


# a line shorter than this is not looked at by ``has_deep_line``: it holds at most LONG_LINE / 2
# levels of valid JSON (pyarrow.json reads 2,000 in ~0.3 s; 8,000 took ~10 s, 20,000 killed it)
LONG_LINE = 4096

# each bracket as one signed byte (+1 opening, -1 closing), for ``bytes.translate``
_BRACKET_STEP = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))
_NOT_BRACKET_OR_QUOTE = bytes(c for c in range(256) if c not in b'[]{}"')


def has_deep_line(block: bytes, limit: int = MAX_DEPTH, long_line: int = LONG_LINE,
                  ends: np.ndarray | None = None) -> bool:
    """Whether some line of ``block`` may hold brackets nested more than ``limit`` deep (counted
    from the line's start), so that it must go to the row reader, which quarantines such a row.

    Nesting N deep takes a line of 2N bytes, so only lines of ``long_line`` bytes or more are
    looked at: found by probing ``long_line`` bytes at a time from the last line end seen
    (``rfind``: 256 probes per MiB of ordinary data, nothing else). Such a line needs more than
    ``limit`` opening brackets; then more than ``limit`` opening ones in its first half or closing
    ones in its second half (a value open in the first half was opened there; one open in the
    second half is closed there, or the line is not JSON and pyarrow.json stops at it); then the
    exact count (``line_depth``). Brackets inside strings can only make it say yes where the row
    reader then finds nothing wrong.

    ``ends``: the positions of every line end in ``block`` (``scan_lines``), where known: the long
    lines are then read from them instead of probed for (the same lines, the same answer)."""
    n, arr = len(block), None
    if ends is not None:
        starts = np.concatenate(([0], ends + 1))
        stops = np.concatenate((ends, [n]))
        for p, end in zip(*(x[stops - starts >= long_line].tolist() for x in (starts, stops))):
            arr = np.frombuffer(block, np.uint8) if arr is None else arr
            if _deep_line_at(block, arr, p, end, limit):
                return True
        return False
    p = 0
    while p + long_line <= n:
        q = block.rfind(b"\n", p, p + long_line)
        if q >= 0:
            p = q + 1
            continue
        end = block.find(b"\n", p + long_line)
        end = n if end < 0 else end
        arr = np.frombuffer(block, np.uint8) if arr is None else arr
        if _deep_line_at(block, arr, p, end, limit):
            return True
        p = end + 1
    return False


def _deep_line_at(block: bytes, arr: np.ndarray, p: int, end: int, limit: int) -> bool:
    """Whether the line ``block[p:end]`` nests more than ``limit`` deep (``has_deep_line``)."""
    mid = (p + end) // 2
    return (_count(arr, p, end, 0x7B) > limit
            and (_count(arr, p, mid, 0x7B) > limit or _count(arr, mid, end, 0x7D) > limit)
            and line_depth(block[p:end]) > limit)


def _count(arr: np.ndarray, start: int, end: int, which: int, step: int = 1 << 24) -> int:
    """Opening (``which`` 0x7B) or closing (0x7D) brackets in ``arr[start:end]``: with the 0x20
    bit set "[" reads as "{" and "]" as "}" (numpy: ~6x as fast as two ``bytes.count``)."""
    if end - start <= step:
        return int(np.count_nonzero((arr[start:end] | 0x20) == which))
    return sum(_count(arr, i, min(i + step, end), which, step) for i in range(start, end, step))


def line_depth(line: bytes, chunk: int = 1 << 20) -> int:
    """How deep the brackets of one JSON line nest, those inside its strings left out; counted
    from the line's start, so brackets that do not balance can only make it say more. ``chunk``
    brackets at a time (memory stays small, however long the line)."""
    if b"\\" in line:  # escaped backslashes, then escaped quotes, out: every quote left delimits
        line = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    # the text between quotes 1 and 2, 3 and 4, ... is a string (one not closed: to the line's end)
    outside = b"".join(line.translate(None, _NOT_BRACKET_OR_QUOTE).split(b'"')[::2])
    steps = outside.translate(_BRACKET_STEP)  # +1 / -1 each
    best = depth = 0
    for s in range(0, len(steps), chunk):
        depth_at = np.cumsum(np.frombuffer(steps, np.int8, min(chunk, len(steps) - s), s), dtype=np.int64)
        best = max(best, depth + int(depth_at.max()))
        depth += int(depth_at[-1])
    return best


def jsonl_block(block: bytes, line0: int, final: bool, src: str, spec: Spec, encoding: str) -> Batch:
    parsed = _parse_block(block, line0, final, spec.hash_kernel == "llvm")
    return _finish_block(block, line0, final, parsed, src, spec, encoding)


class _RowReaderRejects(Exception):
    """The row reader cannot read a line that ``pyarrow.json`` did (an integer of more digits
    than Python reads, which pyarrow took as a float): the block goes row by row."""


def _finish_block(block, line0, final, parsed, src, spec, encoding) -> Batch:
    if parsed is None:
        return rows_batch(src, _rows_of_lines(block, line0, final, encoding), spec)
    table, linenos, all_ascii, no_ws_runs, ends, ahead = parsed
    nl = None

    def fallback(i: int):
        nonlocal nl
        if nl is None:  # line k runs from nl[k] + 1 to nl[k + 1]
            nl = np.concatenate([[-1], ends, [len(block)]])
        k = int(linenos[i] - line0)
        raw = block[nl[k] + 1:nl[k + 1]]
        row = parse_jsonl_line(int(linenos[i]), raw, False, encoding)
        if row[2] is not None:  # not every caller looks at the reason (metadata written by row)
            raise _RowReaderRejects(row[2])
        return row[1], row[2]

    try:
        return table_batch(src, table, linenos, spec, fallback, all_ascii, no_ws_runs, inferred_types=True,
                           ahead=ahead)
    except _RowReaderRejects:  # rare: the row reader quarantines the line, with its reason
        return rows_batch(src, _rows_of_lines(block, line0, final, encoding), spec)


def _nonblank_linenos(block: bytes, lines: BlockLines, line0: int) -> np.ndarray:
    """Line numbers of the lines of ``block`` that are not blank (pyarrow.json skips those)."""
    ends = lines.ends
    n_lines = ends.size + (1 if len(block) and block[-1:] != b"\n" else 0)
    numbers = np.arange(line0, line0 + n_lines, dtype=np.int64)
    if not lines.maybe_blank:  # no line starts with a byte <= 32: none is blank
        return numbers
    starts = np.concatenate([[0], ends + 1])
    if starts[-1] >= len(block):
        starts = starts[:-1]
    arr = np.frombuffer(block, np.uint8)
    maybe = np.flatnonzero(arr[starts] <= 32)
    stops = np.concatenate([ends, [len(block)]])
    blank = [k for k in maybe.tolist() if not block[starts[k]:stops[k]].strip()]
    return np.delete(numbers, blank)
