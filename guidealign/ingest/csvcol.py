"""CSV in columnar blocks: cut at record ends, parsed by ``pyarrow.csv``, checked like JSONL blocks.

The row-by-row reader (``csvrows.read_csv``: Python's ``csv`` module) is the reference. A block
goes through ``pyarrow.csv`` only where both must read it the same way:

- its quotes are the plain RFC 4180 kind: a quote opens a field (right after a delimiter, a
  line end or the block start) and closes it (right before a delimiter, a line end or the block
  end), and quotes inside quoted fields are doubled. Then the record ends are exactly the line
  ends with an even number of quotes before them, for both parsers, and every block is cut at
  one of those;
- it is UTF-8, has no NUL byte, no lone CR, every record has the header's number of fields and
  no field is longer than ``csv.field_size_limit()``.

A block that fails the second kind of check is read by the row reader alone (it starts and ends
at record ends, so the row reader reads it as it would read it within the whole file); one that
fails the quoting check makes the row reader take over for the rest of the file (past a quote
the two do not agree on, record ends cannot be known without it). A field with text after its
closing quote (``"a"b``: pyarrow.csv and Python's csv would both drop the quotes) fails it, so
the row reader quarantines that row (or, one column, takes the line as written) at any block
size. So quarantine reasons and line numbers are the row reader's. A header line that is not
plain (quotes across lines, a lone CR, duplicate names, bytes that are not UTF-8) sends the
whole file to the row reader. A file with a one-column header has no delimiter
(``csvrows.ONE_COLUMN``): a line is one field, commas and all; ``pyarrow.csv`` is given a
control byte the block does not hold as its delimiter.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from guidealign.core.ids import WHITESPACE
from guidealign.ingest.arrays import int_arrow, lit
from guidealign.ingest.batch import Batch, Spec, rows_batch, table_batch
from guidealign.ingest.encodings import open_utf8, read_error
from guidealign.ingest.blocks import BOM, RecordTooLong, cut_blocks, one_piece, prefetch, scan
from guidealign.ingest.csvrows import (_EXCEL_SEP, CSV_FIELD_LIMIT, HEADER_PAD, ONE_COLUMN, CsvReader, _csv_rows,
                                      csv_body, csv_names, no_prompt_column, read_csv, repeats_header,
                                      sniff_delimiter)

QUOTE, NL, CR = 34, 10, 13
SCAN_STEP = 1 << 16
# bytes a record may take before the row reader takes over for the rest of the file (a record
# longer than a block makes a longer block, up to this); the row reader's field limit is as big
MAX_RECORD_BYTES = CSV_FIELD_LIMIT


def csv_batches(path: Path, src: str, spec: Spec, encoding: str = "auto", delimiter: str = "auto",
                block_bytes: int = 4 << 20, rows_per_batch: int = 65536,
                encodings: dict | None = None) -> Iterator[Batch]:
    """Batches of a CSV/TSV file: columnar blocks where they read as the row reader reads them,
    row by row elsewhere. One background thread reads, cuts and parses the next blocks.
    ``encodings``: the encoding the file is read with is recorded there under ``src``."""
    prompt = (spec.field, spec.aliases)
    stream, enc = open_utf8(path, encoding)
    if encodings is not None:
        encodings[src] = enc
    with stream:
        head = stream.readline()
        setup = _header(head, path, delimiter)
        if setup is None:  # not a plain header: the row reader reads the whole file
            stream.close()
            yield from _row_batches(src, read_csv(path, encoding, delimiter, prompt), spec, rows_per_batch)
            return
        names, delim = setup
        note = no_prompt_column(names, 1, head.decode("utf-8"), prompt)  # (as the row reader says it)
        if note is not None:
            yield rows_batch(src, [note], spec)
        for item in prefetch(_parsed(stream, names, delim, block_bytes)):
            kind = item[0]
            if kind == "table":
                _, block, offset, parsed = item
                yield _table_batch(block, offset, parsed, names, delim, enc, src, spec)
            elif kind == "rows":  # one block alone, row by row (with the cut-off check when last)
                _, block, offset, final = item
                rdr = _reader(io.BytesIO(block), delim)
                rows = csv_body(rdr, names, delim, enc, stream, offset, prompt) if final \
                    else _csv_rows(rdr, names, delim, enc, offset, prompt)
                yield from _row_batches(src, rows, spec, rows_per_batch)
            elif kind == "rest":  # the row reader from here to the end (the producer has stopped)
                _, prefix, offset = item
                rows = csv_body(_reader(_Prefixed(prefix, stream), delim), names, delim, enc, stream, offset,
                                prompt)
                yield from _row_batches(src, rows, spec, rows_per_batch)
            else:
                yield rows_batch(src, [(0, None, item[1])], spec)


def _parsed(stream, names: list[str], delim: str, block_bytes: int):
    """What to do with each block: ("table", block, offset, parsed), ("rows", block, offset,
    is last), ("rest", bytes read, offset) (and then nothing more is read), or ("error", why)."""
    offset = 1  # lines before the block (Python's count: \n, \r\n or a lone \r ends a line)
    saw_final = False
    try:
        for block, final, rest in cut_blocks(stream, block_bytes, _last_record_end,
                                             max_record=max(MAX_RECORD_BYTES, 2 * block_bytes)):
            saw_final = final
            info = _structure(block, delim)
            if info is None:  # quotes the parsers may read differently: rows from here on
                yield "rest", block + rest(), offset
                return
            parsed = None if final and read_error(stream) else _parse(block, info, names, delim, offset)
            yield ("rows", block, offset, final) if parsed is None else ("table", block, offset, parsed)
            offset += info.lines
    except RecordTooLong as e:
        # a quote never closed (or a record past the limit): the row reader reads on from here,
        # streaming, instead of this thread holding the rest of the file to find a record end
        yield "rest", e.data, offset
        return
    if not saw_final and read_error(stream):
        yield "error", read_error(stream)


def _row_batches(src, rows, spec, n) -> Iterator[Batch]:
    while True:
        chunk = [r for _, r in zip(range(n), rows)]
        if not chunk:
            return
        yield rows_batch(src, chunk, spec)


def _reader(raw, delim):
    f = io.TextIOWrapper(raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw),
                         encoding="utf-8", errors="surrogateescape", newline="")
    return CsvReader(f, delim)


class _Prefixed(io.RawIOBase):
    """``prefix`` then the rest of ``stream``."""

    def __init__(self, prefix: bytes, stream):
        self.prefix, self.stream = memoryview(prefix), stream

    def readable(self):
        return True

    def readinto(self, b):
        if self.prefix.nbytes:
            n = min(len(b), self.prefix.nbytes)
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.stream.read(len(b))
        b[:len(data)] = data
        return len(data)


def _header(head: bytes, path: Path, delimiter: str):
    """(column names, delimiter) when the first line is a plain header, else None."""
    if not head or b"\0" in head:
        return None
    body = head[:-2] if head.endswith(b"\r\n") else head.rstrip(b"\n")
    if b"\r" in body or b"\n" in body:
        return None
    try:
        first = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not first.strip() or _EXCEL_SEP.fullmatch(first.rstrip("\r\n")):
        return None  # a blank line (spaces too) or Excel's "sep=;": the row reader skips it
    delim = sniff_delimiter(first.splitlines()[0] if first else "", path, delimiter)
    if len(delim) != 1 or delim in '"\r\n':
        return None
    arr = np.frombuffer(body, np.uint8)
    if not _quotes_ok(arr, np.flatnonzero(arr == QUOTE), ord(delim)):
        return None
    try:
        header = next(csv.reader([first], delimiter=delim))
    except (csv.Error, StopIteration):
        return None
    names = csv_names(header)
    if len(set(names)) != len(names) or not names:
        return None
    if len(names) == 1:  # one column: a line is one field, delimiters and all (as the row reader reads it)
        delim = ONE_COLUMN
    return names, delim


def _last_record_end(buf: bytes) -> int:
    """Position of the last line end with an even number of quotes before it, or -1."""
    end = buf.rfind(b"\n")
    if b'"' not in buf or end < 0:
        return end
    arr = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(arr == NL)
    even = np.searchsorted(np.flatnonzero(arr == QUOTE), nl) % 2 == 0
    ok = nl[even]
    return int(ok[-1]) if ok.size else -1


class _Info:
    __slots__ = ("scan", "nl", "term", "quoted_nl", "lines", "lone_cr", "crlf")


def _structure(block: bytes, delim: str) -> _Info | None:
    """Line and record ends of a block; None when its quotes are not the plain kind. The line
    ends' positions come with the scan (the records' line numbers need them when a line may be
    blank, the row reader's fallback for a bad row whenever there is one)."""
    arr = np.frombuffer(block, np.uint8)
    info = _Info()
    info.scan = sc = scan(arr, SCAN_STEP, count_ctrl=True, count_cr=b"\r" in block, positions=True)
    info.crlf = sc.n_crlf
    info.lone_cr = sc.n_cr - sc.n_crlf
    info.lines = sc.n_nl + info.lone_cr
    info.nl, info.term = sc.nl, None
    info.quoted_nl = False
    limit = csv.field_size_limit()
    if b'"' in block:
        q = np.flatnonzero(arr == QUOTE)
        if q.size % 2 or not _quotes_ok(arr, q, ord(delim)):
            return None
        even = np.searchsorted(q, info.nl) % 2 == 0
        info.term = info.nl[even]
        info.quoted_nl = not even.all()
    elif len(block) > limit and (sc.long_line or 2 * SCAN_STEP > limit):
        info.term = info.nl
    # a field over Python's csv limit is an error that drops the rest of its line, so after one
    # in a quoted multi-line field the row reader would find other record ends: rows from here
    # (every SCAN_STEP bytes holding a line end, no line is longer than 2 * SCAN_STEP)
    if info.term is not None and len(block) > limit:
        if np.diff(np.concatenate([[-1], info.term, [len(block)]])).max() > limit:
            return None
    return info


def _quotes_ok(arr: np.ndarray, q: np.ndarray, delim: int) -> bool:
    """Every quote opens a field, closes one, or is half of a doubled quote inside one."""
    if not q.size:
        return True
    if q.size % 2:
        return False
    n = arr.size
    opening, closing = q[0::2], q[1::2]
    # a closing quote followed at once by an opening one is a doubled quote: both fine there
    doubled = np.zeros(closing.size, dtype=bool)
    if closing.size > 1:
        doubled[:-1] = opening[1:] == closing[:-1] + 1
    starts = opening[1:][~doubled[:-1]] if closing.size > 1 else opening[1:]
    starts = np.concatenate([opening[:1], starts])
    ends = closing[~doubled]
    before = arr[starts[starts > 0] - 1]
    if not np.isin(before, (delim, NL, CR)).all():
        return False
    after = arr[ends[ends < n - 1] + 1]
    return bool(np.isin(after, (delim, NL, CR)).all())


def _parse(block: bytes, info: _Info, names: list[str], delim: str, offset: int):
    """(table, line numbers, all ASCII, no whitespace runs, record ends) of the block through
    pyarrow.csv, or None when the row reader must read it."""
    if info.lone_cr or b"\0" in block or block.startswith(BOM):
        return None  # BOM: pyarrow.csv drops one at the start of what it parses, Python's csv keeps it
    all_ascii = block.isascii()
    if not all_ascii:
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
    # the records: line ends outside quotes, less the blank lines (both parsers skip those);
    # each one's line number is the row reader's: the line the record starts on
    arr = np.frombuffer(block, np.uint8)
    sc = info.scan
    tail = bool(len(block)) and block[-1] != NL  # a last line without a line end (end of file)
    if info.term is None and not sc.maybe_blank:  # every line is one record
        linenos = np.arange(offset + 1, offset + 1 + sc.n_nl + tail, dtype=np.int64)
    else:
        if info.term is None:
            info.term = info.nl
        starts, _ = _records(arr, info.term)
        linenos = (np.searchsorted(info.nl, starts) + 1 + offset).astype(np.int64)
    col_names = [f"c{i}" for i in range(len(names))]
    sep = delim
    if delim == ONE_COLUMN:  # no delimiter: pyarrow.csv gets a control byte the block does not hold
        sep = next((c for c in "\x1f\x1e\x01\x02\x03" if c.encode() not in block), None)
        if sep is None:
            return None
    try:
        table = pacsv.read_csv(
            pa.BufferReader(block),
            read_options=pacsv.ReadOptions(column_names=col_names, use_threads=False,
                                           block_size=one_piece(block)),
            parse_options=pacsv.ParseOptions(delimiter=sep, quote_char='"', double_quote=True, escape_char=False,
                                             newlines_in_values=info.quoted_nl, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in col_names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                 null_values=[], check_utf8=True))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # a row with another number of fields, ...: the row reader says which
    if table.num_rows != linenos.size or _holds_header(table, names):
        return None
    # whitespace runs need the collapsing pass unless the block is ASCII with no control byte
    # but the record ends (CRLF included) and no two spaces in a row
    no_ws_runs = (all_ascii and not info.quoted_nl and sc.n_ctrl == sc.n_nl + info.crlf
                  and not sc.double_space)
    # one chunk per column: the block is parsed as one piece in this thread (see jsonl._read_json_block)
    term = info.nl if info.term is None else info.term  # the record ends: line ends outside quotes
    return table.rename_columns(names).combine_chunks(), linenos, all_ascii, no_ws_runs, term


def _holds_header(table: pa.Table, names: list[str]) -> bool:
    """Whether a record of the block may repeat the header line (``csvrows.repeats_header``: the
    row reader quarantines it). In the column of fewest bytes (an id's, say), the values short
    enough (its name and ``HEADER_PAD`` characters of 3 bytes at most: offsets alone) that hold
    the name are kept where they are that name as ``csv_names`` reads one (byte-order marks
    dropped, then the characters ``str.strip`` drops), and only those records are checked in
    full."""
    k = min(range(len(names)), key=lambda i: table.column(i).nbytes)
    name = names[k]
    # (scalars made from buffers: a bare Python value goes through the pandas shim, ``arrays.lit``)
    most = int_arrow([len(name.encode()) + 3 * HEADER_PAD])[0]
    short = pc.less_equal(pc.binary_length(table.column(k)), most)
    found = table.filter(short)
    if found.num_rows:
        found = found.filter(pc.match_substring(found.column(k), name))
    if not found.num_rows:
        return False
    value = pc.utf8_trim(pc.replace_substring(found.column(k), "\ufeff", ""), WHITESPACE)
    same = pc.equal(value, lit(name))
    if not pc.any(same).as_py():
        return False
    return any(repeats_header(list(r.values()), names) for r in found.filter(same).to_pylist())


def _table_batch(block, offset, parsed, names, delim, enc, src, spec) -> Batch:
    table, linenos, all_ascii, no_ws_runs, term = parsed
    spans: list = []

    def fallback(i: int):  # the row reader's reading of record i (its bytes alone)
        if not spans:  # the record's bytes alone go to the row reader (the whole block: 3x slower at 0.5% bad rows)
            spans.append(_records(np.frombuffer(block, np.uint8), term))
        starts, ends = spans[0]
        rec = block[starts[i]:ends[i] + 1]  # with its line end
        (_, row, err), = _csv_rows(_reader(io.BytesIO(rec), delim), names, delim, enc, 0,
                                   (spec.field, spec.aliases))
        return row, err

    return table_batch(src, table, linenos, spec, fallback, all_ascii, no_ws_runs)


def _records(arr: np.ndarray, term: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) offsets of the records ending at ``term`` (the record ends: line ends
    outside quotes) and at the block's end when its last line has none, less the blank ones
    (empty, or a lone CR before the line end: both parsers skip those)."""
    tail = bool(arr.size) and arr[-1] != NL  # a last line without a line end (end of file)
    ends = np.concatenate([term, [arr.size]]) if tail else term
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lens = ends - starts
    blank = lens == 0
    one = np.flatnonzero(lens == 1)
    blank[one] = arr[starts[one]] == CR
    return starts[~blank], ends[~blank]
