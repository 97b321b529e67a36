"""Byte blocks for the columnar readers (JSONL, CSV): cut at record ends, scanned in one pass,
parsed one ahead in a background thread."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

# a UTF-8 byte-order mark: pyarrow's JSON and CSV readers skip one at the start of the bytes they
# parse (so at a block start, not elsewhere); Python's readers keep it, so such a block goes row by row
BOM = b"\xef\xbb\xbf"


def one_piece(block: bytes) -> int:
    """pyarrow json/csv ``block_size`` that parses ``block`` as one piece; it is a C int, so a
    block past 2 GiB (a line that long, or a huge ingest.block_bytes) is parsed in pieces."""
    return min(len(block) + 1, (1 << 31) - 1)


def last_line_end(buf: bytes) -> int:
    """Position of the last line end (the record end of JSONL), or -1."""
    return buf.rfind(b"\n")


class RecordTooLong(Exception):
    """No record end in ``max_record`` bytes (e.g. a CSV quote that is never closed): ``data``
    holds the bytes read and not yet given out; the stream goes on after them."""

    def __init__(self, data: bytes):
        super().__init__(f"no record end in {len(data)} bytes")
        self.data = data


def cut_blocks(stream, block_bytes: int, last_end: Callable[[bytes], int] = last_line_end,
               max_record: int | None = None) -> Iterator[tuple[bytes, bool, Callable[[], bytes]]]:
    """(block, is last, rest) of a byte stream, each block ending at a record end
    (``last_end(buf)``: the position of the last one, or -1); ``rest()`` gives the bytes read
    past the block (for a row reader taking over). It reads one ahead, so that the last block
    is known as such (a cut-off file's last record is suspect); a record longer than a block
    makes the block longer, up to ``max_record`` bytes: past that it raises
    :class:`RecordTooLong` rather than hold the rest of the file."""
    carry, data = b"", stream.read(block_bytes)
    while True:
        if not data:
            if carry:
                yield carry, True, lambda: b""
            return
        nxt = stream.read(block_bytes)
        if last_end is last_line_end and carry and (k := data.rfind(b"\n")) >= 0:
            # JSONL: the cut is in the new bytes, so the block is made with one copy, not two
            # (carry + data, then its head): 1M rows, ~2% less CPU
            block, carry = b"".join((carry, memoryview(data)[:k + 1])), data[k + 1:]
        else:
            buf = carry + data if carry else data
            cut = last_end(buf) + 1
            if cut == 0 and nxt:
                if max_record is not None and len(buf) >= max_record:
                    raise RecordTooLong(buf + nxt)
                carry, data = buf, nxt  # one record longer than a block: read more
                continue
            if cut == 0:
                cut = len(buf)
            block, carry = buf[:cut], buf[cut:]
        final = not nxt and not carry
        yield block, final, (lambda carry=carry, nxt=nxt: carry + nxt)
        if final:
            return
        data = nxt


_END = object()


def prefetch(items: Iterator, depth: int = 2, name: str = "ingest-parse") -> Iterator:
    """The items of ``items``, each made by one background thread up to ``depth`` ahead (reading
    and parsing release the GIL, so they overlap the caller's work on the previous item)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        ahead = deque(pool.submit(next, items, _END) for _ in range(depth))
        while True:
            item = ahead.popleft().result()
            if item is _END:
                for f in ahead:
                    f.result()
                return
            ahead.append(pool.submit(next, items, _END))
            yield item


class Scan:
    """What one pass over a block's bytes tells: line ends, whether some line may be blank (one
    starts with a byte <= 32), two spaces in a row somewhere, control bytes, CRs and CRLFs, and
    whether some ``step`` bytes in a row hold no line end (a line may be longer than ``step``),
    and (``positions``) where the line ends are."""
    __slots__ = ("n_nl", "maybe_blank", "double_space", "n_ctrl", "n_cr", "n_crlf", "long_line", "nl")


def scan(arr: np.ndarray, step: int = 1 << 16, count_ctrl: bool = False, count_cr: bool = False,
         positions: bool = False) -> Scan:
    """One pass in cache-sized steps (temporaries of the whole block cost more in page faults
    than the work); ``n_ctrl`` is counted only with ``count_ctrl``, ``n_cr`` and ``n_crlf``
    only with ``count_cr``, the line ends' positions (``nl``) found only with ``positions``."""
    out = Scan()
    n_nl = n_ctrl = n_cr = n_crlf = 0
    blank, double, long_line = bool(arr.size) and bool(arr[0] <= 32), False, False
    parts = []
    for i in range(0, arr.size, step):
        a = arr[i:i + step + 1]  # one byte of overlap for the pairs
        nl = a == 10
        if positions:
            pos = np.flatnonzero(nl[:step])
            parts.append(pos + i if i else pos)
            k = pos.size
        else:
            k = int(np.count_nonzero(nl[:step]))
        n_nl += k
        long_line |= k == 0 and a.size > step
        low = a <= 32
        if not blank:
            blank = bool(np.logical_and(nl[:-1], low[1:]).any())
        sp = a == 32
        if count_ctrl:
            n_ctrl += int(np.count_nonzero(low[:step])) - int(np.count_nonzero(sp[:step]))
        if count_cr:
            cr = a[:step] == 13
            n_cr += int(np.count_nonzero(cr))
            n_crlf += int(np.count_nonzero(np.logical_and(cr[:a.size - 1], nl[1:])))
        if not double:
            double = bool(np.logical_and(sp[1:], sp[:-1]).any())
    out.n_nl, out.maybe_blank, out.double_space, out.long_line = n_nl, blank, double, long_line
    out.n_ctrl, out.n_cr, out.n_crlf = n_ctrl, n_cr, n_crlf
    out.nl = (np.concatenate(parts) if parts else np.zeros(0, np.int64)) if positions else None
    return out
