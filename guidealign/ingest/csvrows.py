"""CSV/TSV, row by row (Python's ``csv``): the reference the columnar CSV path
(``guidealign.ingest.csvcol``) matches and falls back to. Delimiters are sniffed, a header's
spelling is free, a quote never closed (or closing lines later with text after it: see
``_stray_quote``) is quarantined and the lines after it read again, Excel's ``sep=;`` line names
the delimiter, a row with more fields than the header (not just trailing delimiters) is
quarantined, and a one-column file is read a line a prompt. A field that starts with a quote and has text after its closing
quote (``"a"b``: Python's csv, non-strict, drops the quotes and joins the rest) is quarantined;
in a one-column file such a line is the prompt as written, quotes and all."""
from __future__ import annotations

import collections
import csv
import io
import re
from pathlib import Path
from typing import Iterator

from guidealign.ingest.encodings import has_surrogates, inner_suffix, open_utf8, read_error, utf8_error_reason
from guidealign.ingest.keys import unique_names
from guidealign.ingest.rows import Row

DELIMITERS = ",;\t|"
_EXCEL_SEP = re.compile(r"sep=([^\"\r\n])", re.IGNORECASE)  # a first line Excel writes and reads
# Python's csv module refuses a field over 131072 chars by default and then goes on mid-field, so
# the rest of a long (quoted, multi-line) document column and the rows after it came out as
# made-up records. A field this long is data (pandas has no limit); past it, a runaway quote.
CSV_FIELD_LIMIT = 1 << 26
if csv.field_size_limit() < CSV_FIELD_LIMIT:
    csv.field_size_limit(CSV_FIELD_LIMIT)


def sniff_delimiter(header: str, path: Path, delimiter: str = "auto") -> str:
    if delimiter != "auto":
        return "\t" if delimiter in ("\\t", "tab") else delimiter
    if inner_suffix(path) == ".tsv":
        return "\t"
    counts = {d: _count_outside_quotes(header, d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _count_outside_quotes(line: str, ch: str) -> int:
    n, quoted = 0, False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == ch and not quoted:
            n += 1
    return n


def read_csv(path: Path, encoding: str = "auto", delimiter: str = "auto",
             prompt: tuple | None = None) -> Iterator[Row]:
    """``prompt``: (prompt field, aliases), for the reason a short row has no prompt (default:
    IngestConfig's)."""
    stream, enc = open_utf8(path, encoding)
    with stream:
        f = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
        first, skipped = _first_text_line(f, 0)  # blank lines before the header: the header is next
        sep = _EXCEL_SEP.fullmatch(first.rstrip("\r\n"))
        if sep:  # Excel's "sep=;" line: the delimiter, not a header (unless one is configured)
            first, skipped = _first_text_line(f, skipped + 1)
            if delimiter == "auto":
                delimiter = sep.group(1)
        delim = sniff_delimiter(first.splitlines()[0] if first else "", path, delimiter)
        reader = CsvReader(f, delim, first=[first])
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield skipped + 1, None, f"the header line cannot be read as CSV: {e}"
            return
        if reader.ran_out and len(reader.held) > 1:  # the header's quote took in the whole file
            yield skipped + 1, None, (f"the header line cannot be read as CSV: a quote opened on line "
                                      f"{skipped + 1} is never closed (the whole file was read as the "
                                      f"header); close the quote or double it (\"\")")
            return
        names = csv_names(header)
        note = no_prompt_column(names, skipped + 1, "".join(reader.held), prompt)
        if note is not None:
            yield note
        if len(names) == 1:  # one column: a line is one field, delimiters and all
            delim = ONE_COLUMN
            reader = CsvReader(f, delim, reader.line_num)
        yield from csv_body(reader, names, delim, enc, stream, offset=skipped, prompt=prompt, header=skipped + 1)


def _first_text_line(f, skipped: int) -> tuple[str, int]:
    """The next line of ``f`` that is not blank ("" at the end), and ``skipped`` plus the blank
    lines passed over."""
    line = f.readline()
    while line and not line.strip():
        line, skipped = f.readline(), skipped + 1
    return line, skipped


def csv_names(header: list[str]) -> list[str]:
    return unique_names([h.replace("\ufeff", "").strip() for h in header])


NO_PROMPT_COLUMN = "no prompt column in the header"


def no_prompt_column(names: list[str], line: int, text: str, prompt: tuple | None = None) -> Row | None:
    """A quarantine row for the header line ``text`` (line ``line``, columns ``names``) when no
    column is the prompt field or an alias, else None. Every row of such a file is quarantined
    as missing its prompt; most often the file has no header line, and its first row was taken
    for one: said here, and the line kept (it is no header a row can be checked against)."""
    from guidealign.ingest.keys import find_prompt_key

    field, aliases = prompt if prompt is not None else _default_prompt()
    if not names or find_prompt_key(names, field, aliases) is not None:  # (no names: an empty file)
        return None
    tried = " or ".join(repr(n) for n in (field, *aliases))
    raw = _raw(_strip_eol(text))
    columns = _fields(len(names)).replace("field", "column")
    return line, {"_raw": raw}, (
        f"{NO_PROMPT_COLUMN}: line {line} ({raw[:80]!r}) was read as the header line, and "
        f"none of its {columns} is named {tried}; if the file has no header line, this line is its "
        f"first row: add a header line (its prompt column named {field!r}); else --set "
        "ingest.prompt_field=NAME names the prompt column")


def csv_body(reader, names, delim, enc, stream, offset: int = 0, prompt: tuple | None = None,
             header: int = 1) -> Iterator[Row]:
    """The rows of ``reader`` (a ``CsvReader``) up to the end of ``stream`` (``offset``: lines
    before the reader's first line; ``header``: the header's line). The last row of a file cut
    off (``read_error``) is suspect, so it is held back and quarantined with the reason."""
    held = None  # each row waits for the next one: the last row of a cut-off file is suspect
    for row in _csv_rows(reader, names, delim, enc, offset, prompt, header):
        if held is not None:
            yield held
        held = row
    err = read_error(stream)
    if err and held is not None and held[2] is None:
        yield held[0], held[1], f"the last row may be cut off: {err}"
    elif held is not None:
        yield held
    if err:
        yield 0, None, err


def _csv_rows(reader, names, delim, enc, offset: int = 0, prompt: tuple | None = None,
              header: int = 1) -> Iterator[Row]:
    """The rows of ``reader`` (a ``CsvReader``): a record with more fields than the header
    (but for empty ones: trailing delimiters) is quarantined, not cut at a delimiter; a quote
    never closed is quarantined with the lines up to it, and the lines after it read again.
    Under a header (line ``header``) that names no prompt column, a row that is read says so:
    its keys are that line's values (most often a first row taken for the header), no field
    names to list as the row's."""
    from guidealign.ingest.keys import find_prompt_key

    field, aliases = prompt if prompt is not None else _default_prompt()
    n = len(names)
    pkey = find_prompt_key(names, field, aliases)
    pat = names.index(pkey) if pkey is not None else n  # the prompt column
    # (the header line's own quarantine row, ``no_prompt_column``, says what it was read as)
    headless = _header_names_no_prompt(field, header) if pkey is None else None
    held, rdr = reader.held, reader.rdr
    while True:
        held.clear()
        try:
            row = next(rdr)
        except StopIteration:
            return
        except csv.Error as e:  # a field over the limit: maybe a quote that is never closed
            lost = _runaway_quote(reader, offset, e) if "field limit" in str(e) else None
            if lost is None:
                line = offset + reader.line_num
                lost = line, None, f"line {line} cannot be read as CSV: {e}"
            rdr = reader.rdr
            yield lost
            continue
        if reader.ran_out and held:  # the input ran out inside this record: a quote never closed
            lost = _runaway_quote(reader, offset)
            rdr = reader.rdr
            yield lost
            continue
        # the line the record starts on (a quoted field may hold line ends)
        line = offset + reader.base + rdr.line_num - max(len(held), 1) + 1
        if not row:
            continue
        text = held[0] if len(held) == 1 else "".join(held)
        after = _text_after_quote(text, delim) if '"' in text else None
        if after is not None:
            if delim == ONE_COLUMN and len(held) == 1:  # not one quoted field: the line as written
                row = [_strip_eol(text)]
            elif (stray := _stray_quote(reader, offset, after, n)) is not None:
                rdr = reader.rdr
                yield stray
                continue
            else:
                yield line, {"_raw": _raw(_strip_eol(text))}, _after_quote_reason(
                    text, after, held, names, delim, line)
                continue
        if repeats_header(row, names):
            yield line, {"_raw": _raw(_strip_eol(text))}, (
                f"line {line} repeats the header line (files joined with their header lines?): not a "
                "row; drop the repeated header lines")
            continue
        rec = dict(zip(names, row))
        if len(row) > n:
            rec["_extra_fields"] = row[n:]
        bad = [k for k, v in rec.items() if isinstance(v, str) and has_surrogates(v)]
        if bad:
            raw = _strip_eol(text).encode("utf-8", "surrogateescape")  # the line(s) as written
            reason = utf8_error_reason(line, raw, enc)
            yield line, {"_raw": raw.decode("utf-8", "replace")}, f"{reason} (column {bad[0]!r})"
            continue
        if len(row) > n and any(x.strip() for x in row[n:]):
            yield line, {"_raw": _raw(_strip_eol(text))}, (
                f"line {line} has {len(row)} fields, the header {n}: quote the fields that contain "
                f"the delimiter {delim!r}")
            continue
        if len(row) <= pat < n:  # the file's prompt column (not another alias the row reaches)
            yield line, rec, (f"missing prompt field {pkey!r}: line {line} has {_fields(len(row))}, the "
                              f"header {n}, and the prompt column is past the row's end; add the missing "
                              f"fields (or quote fields that hold line breaks)")
            continue
        yield line, rec, headless


def _header_names_no_prompt(field: str, header: int) -> str:
    """The reason for each row under a header (line ``header``) that names no prompt column: it
    points at the header line's quarantine row, not at the row's keys (that line's values)."""
    return (f"missing prompt field {field!r}: the header line (line {header}) names no prompt column "
            f"(see that line's quarantine row, {NO_PROMPT_COLUMN!r}); if the file has no header line, "
            f"add one naming the prompt column {field!r}, else --set ingest.prompt_field=NAME names it")


# characters (spaces, byte-order marks) a field that repeats its column's name may have beside it
HEADER_PAD = 16


def repeats_header(row: list[str], names: list[str]) -> bool:
    """Whether the record ``row`` repeats the header ``names`` (as ``csv_names`` reads a header:
    byte-order marks and spaces aside, up to ``HEADER_PAD`` characters of them a field), as CSV
    files joined with ``cat`` give: read as a row, its prompt would be the prompt column's name
    ("prompt") and its metadata the other names."""
    if len(row) != len(names) or len(row[0]) > len(names[0]) + HEADER_PAD:  # (most rows: one test)
        return False
    return (row[0].replace("\ufeff", "").strip() == names[0]
            and all(len(v) <= len(k) + HEADER_PAD for v, k in zip(row, names)) and csv_names(row) == names)


def _text_after_quote(text: str, delim: str) -> tuple[int, int, int] | None:
    """(field index, opening and closing quotes' positions) of the first field of the record ``text`` that
    starts with a quote and has text after its closing quote (as Python's csv reads quotes, see
    ``_open_quote_line``), else None."""
    pos, end, i = 0, len(text), 0
    while pos < end:  # at a field's start
        if text[pos] == '"':
            k = pos + 1
            while True:
                k = text.find('"', k)
                if k < 0:  # never closed: a runaway quote, not this
                    return None
                if text.startswith('"', k + 1):
                    k += 2
                    continue
                break
            j = k + 1  # spaces before the delimiter are sloppy, not text: csv keeps them (`"hi" ,1`)
            while j < end and text[j] in " \t" and text[j] != delim:
                j += 1
            if j < end and text[j] not in (delim, "\r", "\n"):
                return i, pos, k
            pos = j
        d = text.find(delim, pos)
        if d < 0:
            return None
        pos, i = d + 1, i + 1
    return None


def _after_quote_reason(text: str, after: tuple[int, int, int], held: list[str], names: list[str], delim: str,
                        first: int) -> str:
    """Why the record ``text`` (lines ``held``, the first being line ``first``) is quarantined."""
    i, _, k = after
    q = _line_of(held, k)  # the line of the closing quote
    name = repr(names[i]) if i < len(names) else f"{i + 1} (past the header)"
    hint = ': "" for ", not \\"' if text[k - 1] == "\\" else ""  # \" is no escape in CSV
    return (f"text after the closing quote on line {first + q} of field {name} (quote the whole field "
            f"and double the quotes inside it{hint})")


def _line_of(lines: list[str], pos: int) -> int:
    """Index of the line of ``lines`` that holds position ``pos`` of their text joined."""
    q = 0
    while q < len(lines) - 1 and pos >= len(lines[q]):
        pos, q = pos - len(lines[q]), q + 1
    return q


def _stray_quote(reader: CsvReader, offset: int, after: tuple[int, int, int], n: int) -> Row | None:
    """The record just read (``reader.held``) has a field whose opening quote closes on a later
    line with text after it (``"Why ...`` on one line, ``What does "carpe diem" mean?`` lines
    later): as a quote never closed, a quote left open that took in the lines between. The lines
    up to the quote's as a quarantine row, and ``reader`` restarted on the lines after it. None
    (the record quarantined as it stands) when the field closes on the line it opens on
    (``"a"b``), or, with ``n`` > 1 columns, when the quote's line without that quote does not
    hold ``n`` fields, or the closing quote's line holds an odd number of quotes (``"two`` then
    ``lines" z,6``, ``"Summarize this, briefly:`` then ``The fox" (excerpt),wiki``: a field over
    lines with text after its end, its pieces no rows; an inch mark, ``a 6" sub``, on that line
    takes the lines between into the quarantined record too). In a one-column file every line is a
    prompt, so the lines after the quote's are read."""
    held = reader.held
    o, q = _line_of(held, after[1]), _line_of(held, after[2])
    if q == o:
        return None
    if reader.delim != ONE_COLUMN:
        at = after[1] - sum(len(x) for x in held[:o])
        alone = _strip_eol(held[o][:at] + held[o][at + 1:])
        if _count_outside_quotes(alone, reader.delim) + 1 != n or held[q].count('"') % 2:
            return None
    start = reader.line_num - len(held)  # lines before the record
    line = offset + start + o + 1  # the quote's line; the row is numbered by the record's first
    raw = _strip_eol("".join(held[:o + 1]))
    reader.restart(held[o + 1:], start + o + 1)
    return offset + start + 1, {"_raw": _raw(raw)}, (
        f"a quote opened on line {line} closes on line {offset + start + q + 1} with text after it "
        f"(taken as a quote left open; the lines after line {line} are read again as rows): close "
        f"the quote, or double a quote inside a field (\"\")")


def _strip_eol(raw: str) -> str:
    return raw[:-2] if raw.endswith("\r\n") else raw[:-1] if raw.endswith(("\n", "\r")) else raw


def _raw(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# the delimiter of a one-column CSV: a character no text read here holds (bytes that are not
# UTF-8 come through as U+DC80..U+DCFF), so a line is one field, commas and all (a field that
# starts with a quote may still hold line ends)
ONE_COLUMN = "\ud800"


class CsvReader:
    """``csv.reader`` over ``lines`` (``line_num`` counted from ``base``) that keeps the lines
    of the record being read (``held``; the caller clears it) and whether the input ran out
    inside it: Python's csv (non-strict) hands out a quoted field still open at the end of the
    input as a field, so a quote never closed took in the rest of the file as one field."""

    def __init__(self, lines, delim: str, base: int = 0, first: list[str] | None = None):
        self.delim = delim
        self.held: list[str] = []
        self.src = iter(lines)
        self.pending = collections.deque(first or ())  # lines to read before ``src``'s next
        self._start(base)

    def _start(self, base: int) -> None:
        self.base, self.ran_out = base, False
        self.rdr = csv.reader(self._feed(), delimiter=self.delim)

    def _feed(self):
        # the input is not closed when this generator is (a reader replaced, then collected)
        held, pending, src = self.held, self.pending, self.src
        while True:
            if pending:
                line = pending.popleft()
            else:
                line = next(src, None)
                if line is None:
                    break
            held.append(line)
            yield line
        self.ran_out = True

    def restart(self, lines: list[str], base: int) -> None:
        """Read ``lines`` (held ones) again, then what the input has left, with a new reader."""
        self.pending.extendleft(reversed(lines))
        self._start(base)

    @property
    def line_num(self) -> int:
        return self.base + self.rdr.line_num

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.rdr)


def _default_prompt() -> tuple:
    from guidealign.config.ingest import IngestConfig

    cfg = IngestConfig()
    return cfg.prompt_field, tuple(cfg.prompt_aliases)


def _fields(k: int) -> str:
    return f"{k} field" + ("" if k == 1 else "s")


def _runaway_quote(reader: CsvReader, offset: int, err: csv.Error | None = None) -> Row | None:
    """The record just read (``reader.held``) ends in a quoted field
    still open when the input ran out (``err`` None) or when the field passed the size limit
    (``err``): the lines up to the one with that quote as a quarantine row, and ``reader``
    restarted on the lines after it. With ``err``, None when no quote is left open."""
    held = reader.held
    start = reader.line_num - len(held)  # lines before the record
    at = _open_quote_line(held, reader.delim)
    if at is None:
        if err is not None:
            return None
        at = 0  # cannot happen (csv ran out inside a quote): re-read all but the first line
    line = offset + start + at + 1  # the quote's line; the row is numbered by the record's first
    raw = _strip_eol("".join(held[:at + 1]))
    if err is None:
        why = "is never closed (it took in the rest of the file as one field"
    else:
        why = f"is not closed within {csv.field_size_limit():,} characters (the field size limit"
    reader.restart(held[at + 1:], start + at + 1)
    return offset + start + 1, {"_raw": _raw(raw)}, (
        f"a quote opened on line {line} {why}; the lines after it are read again as rows): close "
        f"the quote, or double a quote inside a field (\"\")")


def _open_quote_line(lines: list[str], delim: str) -> int | None:
    """Index of the line holding the quote that opens the last field of the record ``lines``
    when that quote is never closed (as Python's csv reads quotes: one opens a field only at
    its start, ``""`` inside is a quote), else None."""
    text = "".join(lines)
    pos, end = 0, len(text)
    while pos < end:  # at a field's start
        if text[pos] == '"':
            k = pos + 1
            while True:
                k = text.find('"', k)
                if k < 0:  # never closed: the line that holds text[pos]
                    for i, ln in enumerate(lines):
                        if pos < len(ln):
                            return i
                        pos -= len(ln)
                    return None
                if text.startswith('"', k + 1):
                    k += 2
                    continue
                break
            pos = k + 1
        d = text.find(delim, pos)  # the rest of the field (a quote here is one)
        if d < 0:
            return None
        pos = d + 1
    return None

