"""Byte-level input handling for ingest: decompression, byte-order marks, encodings, line endings.

Every text input (JSONL, JSON, CSV) is read through ``open_utf8``, which returns a binary
stream of UTF-8 bytes with ``\\n`` line ends, whatever the file was saved as:

- compressed, as its magic bytes say (a suffix they contradict is logged, and a file damaged
  from its first byte is refused up front): ``.gz``, ``.bz2``, ``.xz`` (Python's codecs),
  ``.zst`` (pyarrow's zstd codec);
- a UTF-8 byte-order mark is dropped; UTF-16/UTF-32 (with a BOM, or UTF-16 without one, told
  apart by its zero bytes and line ends) are transcoded to UTF-8;
- ``encoding="auto"`` (the default) reads UTF-8, unless the start of the file has bytes that
  are not UTF-8 and no multi-byte UTF-8 sequence at all: then it is a legacy 8-bit export
  and read as cp1252 (Windows' Western code page, a superset of latin-1's printable range);
- any other ``encoding`` is a Python codec name used for the whole file;
- files whose lines end in a lone CR (old Mac/Excel exports) get ``\\n`` line ends.

Bytes that do not decode stay in the stream as bytes that are not UTF-8 (``_escape_bytes``), so
the row readers quarantine exactly those rows with a reason that says how to fix the file; bytes
that end inside a character (a UTF-8 file given ``--encoding utf-16``) are one reason for the
file, which names the encoding (``EncodingMismatch``), not damage.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import io
import lzma
import re
import logging
import zlib
from pathlib import Path

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd",
                ".zstd": "zstd"}
_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")]
_MULTIBYTE_UTF8 = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
SNIFF_BYTES = 1 << 16
CHUNK = 1 << 22
log = logging.getLogger(__name__)


class EncodingError(Exception):
    """The file cannot be opened as text at all (bad codec name, missing decompressor)."""


class EncodingMismatch(ValueError):
    """The file's bytes end inside a character of the encoding it is read as: its bytes are fine,
    the encoding is wrong (or the file is cut), so no re-download or re-compressing is suggested."""


def _escape_bytes(e: UnicodeDecodeError):
    # surrogateescape refuses ASCII bytes (UTF-16's bad code units hold some): the decoder stopped
    # there and the rest of the file was lost. Here a byte that is not UTF-8's continuation byte
    # (ASCII, a lead byte) becomes 0xFF, so that the escaped bytes never read as UTF-8 (a lead
    # byte and what follows it did) and the row is quarantined. The file's end cut inside a
    # character is raised, to be said once for the file.
    if e.reason == "truncated data":
        raise e
    return "".join(chr(0xDC00 | (b if 0x80 <= b < 0xC0 else 0xFF)) for b in e.object[e.start:e.end]), e.end


codecs.register_error("guidealign-escape", _escape_bytes)


# what a decompressor raises on a truncated or damaged file (pyarrow's errors are ValueError/OSError)
_READ_ERRORS = (EOFError, OSError, ValueError, lzma.LZMAError, zlib.error)
_PIECE = 1 << 16


def read_upto(raw, n: int) -> tuple[bytes, Exception | None]:
    """Up to ``n`` bytes of ``raw`` and the error that stopped the reading early, if any.

    Read in pieces (``read1`` where there is one): a buffered decompressor's ``read(n)`` loops
    until it has ``n`` bytes and, when the file is cut off, raises and drops every byte it
    decompressed in that call; piece by piece, the bytes before the damage are kept."""
    read1 = getattr(raw, "read1", None)
    parts, got = [], 0
    while got < n:
        want = min(n - got, _PIECE)
        try:
            piece = read1(want) if read1 is not None else raw.read(want)
        except _READ_ERRORS as e:
            return b"".join(parts), e
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts), None


def compression_of(path: Path) -> str | None:
    """Compression of the file by its magic bytes, else None (plain).

    The magic bytes win over the suffix: a download that the browser decompressed keeps its
    ``.gz`` name, and read as gzip it gave no rows and a "truncated or corrupt" note; a file
    whose start matches no compression is plain. A suffix that the bytes contradict is logged."""
    named = COMPRESSIONS.get(path.suffix.lower())
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return named  # opening it fails again, with the reason, where it is read
    comp = _magic_compression(head)
    if named == "xz" and comp is None and head[:3] == b"\x5d\x00\x00":
        comp = "xz"  # the legacy .lzma format (no magic bytes), which lzma.open reads too
    if named and comp != named and head and (str(path), comp) not in _WARNED:
        _WARNED.add((str(path), comp))
        log.warning("%s: named %s but its first bytes say it is %s: read as %s", path, path.suffix,
                    f"{comp}-compressed" if comp else "not compressed", comp or "plain text")
    return comp


_WARNED: set = set()  # (file, compression) said once: a file is opened more than once


def _magic_compression(head: bytes) -> str | None:
    if head.startswith(b"BZh") and not (head[3:4] and head[3:4] in b"123456789"):
        return None  # bzip2's magic is "BZh" and the block size, 1-9
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"  # a zstd skippable frame
    return next((c for magic, c in _MAGIC if head.startswith(magic)), None)


def inner_suffix(path: Path) -> str:
    """The format suffix under any compression suffix: ``a.jsonl.gz`` -> ``.jsonl``."""
    if path.suffix.lower() in COMPRESSIONS:
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def open_raw(path: Path):
    """The file's bytes, decompressed."""
    comp = compression_of(path)
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    if comp == "zstd":  # pyarrow (a dependency already) carries a zstd codec
        import pyarrow as pa

        return pa.input_stream(str(path), compression="zstd")
    return open(path, "rb")


def sniff_encoding(head: bytes, requested: str = "auto", whole: bool = False) -> tuple[str, int]:
    """(codec, BOM length) for a file that starts with ``head`` (``whole``: that is all of it)."""
    req = None
    if requested != "auto":
        try:
            req = codecs.lookup(requested).name
        except LookupError as e:
            raise EncodingError(f"unknown encoding {requested!r} (try utf-8, cp1252, latin-1, utf-16)") from e
    boms = [(bom, enc) for bom, enc in _BOMS if head.startswith(bom)]  # FF FE 00 00: UTF-32 or UTF-16
    for bom, enc in boms:
        if req in (None, "utf-8-sig") or _bom_fits(req, enc):
            return enc, len(bom)
    if boms:
        # an explicit codec wins, but a BOM that contradicts it is a mistake worth naming
        raise EncodingError(f"the file starts with a {boms[0][1]} byte-order mark but --encoding "
                            f"{requested} was given; drop --encoding or re-save the file")
    if req in ("utf-16", "utf-32"):
        # no BOM to say the byte order (Python's codec would refuse the file): guess it as below
        # from where the zero bytes are, little-endian (what Windows writes) when they do not tell
        order = _zero_bytes_order(head, 4) if req == "utf-32" else _utf16_order(head)
        return req + ("-be" if order == "be" else "-le"), 0
    if req is not None:
        return req, 0
    order = _utf16_order(head)
    if order is not None:
        return f"utf-16-{order}", 0
    try:
        head.decode("utf-8")
        return "utf-8", 0
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and e.reason == "unexpected end of data" and not whole:
            return "utf-8", 0  # the sample cut a character in two (the file's own end is no cut)
    if _MULTIBYTE_UTF8.search(head):
        return "utf-8", 0  # UTF-8 text with some bad rows: those rows are quarantined
    if head.count(0) >= max(4, len(head) // 200):
        # 8-bit text has no zero bytes to speak of: UTF-16 that does not read (or damage); its
        # bad rows are quarantined with the fix (--encoding utf-16), not read as cp1252
        # gibberish. A stray zero byte or two in cp1252 text leaves it cp1252.
        return "utf-8", 0
    return "cp1252", 0


def _bom_fits(codec: str, bom_enc: str) -> bool:
    """Whether a file with ``bom_enc``'s byte-order mark is what the codec ``codec`` (a
    ``codecs.lookup`` name) reads: the same codec, or its byte-order-less form ("utf-16" for
    either UTF-16 mark)."""
    bom_enc = codecs.lookup(bom_enc).name
    return codec == bom_enc or (codec in ("utf-16", "utf-32") and bom_enc.startswith(codec + "-"))


def _zero_bytes_order(head: bytes, width: int) -> str | None:
    """"le"/"be" when the zero bytes of ``head`` say text of ``width``-byte code units (mostly
    ASCII) is little- or big-endian, else None."""
    sample = head[:4096]
    if len(sample) < 2 * width:
        return None
    first, last = sample[0::width], sample[width - 1::width]
    if last.count(0) > 0.3 * len(last) and first.count(0) < 0.05 * len(first):
        return "le"
    if first.count(0) > 0.3 * len(first) and last.count(0) < 0.05 * len(last):
        return "be"
    return None


def _utf16_order(head: bytes) -> str | None:
    """"le"/"be" when ``head`` (no byte-order mark) is UTF-16 text of that byte order, else None.

    Mostly-ASCII text says it by its zero bytes (``_zero_bytes_order``). Text mostly in other
    scripts (Chinese, Cyrillic...) has too few of them for that; it is UTF-16 when it has zero
    bytes, its line ends ("\\n\\0" little-endian, "\\0\\n" big-endian) all sit at code-unit
    boundaries, it decodes as that UTF-16 without an error or a control character, and read as
    UTF-8 it is not text (invalid, or full of control bytes: Cyrillic's 0x04, Greek's 0x03...)."""
    order = _zero_bytes_order(head, 2)
    if order is not None or b"\x00" not in head:
        return order
    fits = [o for o, nl in (("le", b"\n\x00"), ("be", b"\x00\n")) if _utf16_fits(head, o, nl)]
    if len(fits) != 1:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (e.start >= len(head) - 3 and e.reason == "unexpected end of data"):
            return fits[0]  # not UTF-8 (a character cut at the end of the sample aside)
        text = head[:e.start].decode("utf-8")
    controls = len(_CONTROLS.findall(text))
    return fits[0] if controls > max(2, len(text) // 100) else None


_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f]")


def _utf16_fits(head: bytes, order: str, nl: bytes) -> bool:
    """Whether ``head`` reads as UTF-16 text of byte order ``order`` (line end ``nl``): lines ended
    at code-unit boundaries only, no decoding error, no control character."""
    at = [m.start() % 2 for m in re.finditer(re.escape(nl), head)]
    if len(at) < 2 or any(at) or 2 * len(at) < head.count(b"\n"):
        # fewer than two line ends, one across two code units, or most "\n" bytes not line
        # ends of this UTF-16 (8-bit text with a stray zero byte after one of its line ends)
        return False
    try:
        text = codecs.getincrementaldecoder(f"utf-16-{order}")("strict").decode(head, False)
    except UnicodeDecodeError:
        return False
    return not _CONTROLS.search(text)


class _Transcoded(io.RawIOBase):
    """A binary stream of UTF-8 bytes decoded from ``raw`` with ``encoding``."""

    def __init__(self, raw, encoding: str, skip: int, lone_cr: bool, head: bytes, requested: str = "auto",
                 name: str = ""):
        self.raw = raw
        self.enc, self.requested, self.name = encoding, requested, name
        # cp1252 is sniffed from the file's start (not UTF-8, no UTF-8 sequence there): UTF-8
        # text further on would be read as cp1252 gibberish, so the first such bytes are named
        self.watch_utf8 = encoding == "cp1252" and requested == "auto"
        self.offset = skip  # bytes of the file handed to the decoder so far
        self.dec = None if encoding == "utf-8" else codecs.getincrementaldecoder(encoding)("guidealign-escape")
        self.pending = head[skip:]
        self.lone_cr = lone_cr
        self.cr_held = b""  # a CR at the end of a piece, held until the next shows whether an LF follows
        self.buf = b""
        self.eof = False
        self.cause: Exception | None = None  # what stopped the reading early, if anything did
        self.lines = False  # a whole line (a line end) was handed on before that

    def readable(self):
        return True

    def _fill(self) -> bool:
        data = self.pending
        self.pending = b""
        if not data and self.cause is None:
            data, err = read_upto(self.raw, CHUNK)
            if err is not None:
                self.fail(err)
        final = not data
        if self.watch_utf8 and (m := _MULTIBYTE_UTF8.search(data)) is not None:
            self.watch_utf8 = False
            log.warning("%s: read as cp1252 (its first %d KiB are not UTF-8), but from byte %d it holds "
                        "UTF-8 text, whose rows come out garbled (%r as %r): re-save the file in one "
                        "encoding, or pass --encoding utf-8 (its cp1252 rows are then quarantined)",
                        self.name or "input", SNIFF_BYTES >> 10, self.offset + m.start(), m.group(),
                        m.group().decode("cp1252", "replace"))
        self.offset += len(data)
        if self.dec is not None:
            try:
                data = self.dec.decode(data, final).encode("utf-8", "surrogateescape")
            except UnicodeDecodeError as e:  # the bytes end inside a UTF-16/32 code unit
                if self.cause is None:  # a decompressor's error says the file is damaged: kept
                    self.fail(self._mismatch(e.end - e.start))
                data = b""
        if self.lone_cr:  # a CR LF further on (the file changes its line ends) is one line end too
            data, self.cr_held = self.cr_held + data, b""
            if data.endswith(b"\r") and not final:  # its LF may start the next piece
                data, self.cr_held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self.lines = self.lines or b"\n" in data
        self.buf += data
        return not final

    def _mismatch(self, left: int) -> EncodingMismatch:
        """The reason for bytes that end inside a character: the encoding is the likely culprit
        (a UTF-8 file given --encoding utf-16), not damage."""
        cut = f"the file ends inside a character ({left} byte{'s' * (left > 1)} left over as {self.enc})"
        if self.requested != "auto":
            return EncodingMismatch(f"{cut}: it is not {self.enc} text, the encoding given (--encoding or "
                                    f"ingest.encoding {self.requested}), so its rows do not read as such; drop "
                                    "--encoding to have the encoding sniffed, or pass the one the file was saved in")
        return EncodingMismatch(f"{cut}: read as {self.enc} (sniffed from its first bytes), it is not {self.enc} "
                                "text or it is cut off; pass --encoding (ingest.encoding) with the encoding the "
                                "file was saved in, or re-download it if it is cut off")

    def fail(self, e: Exception) -> None:
        """A truncated or damaged compressed file: what came before is kept, the rest reported."""
        self.cause = e

    @property
    def error(self) -> str | None:
        """Why the reading stopped early (None when it did not), worded by ``self.lines``: whether
        a whole line came before (the rows above were kept) or not."""
        return None if self.cause is None else damage_reason(self.cause, self.lines)

    def readinto(self, b):
        while not self.buf and not self.eof:
            self.eof = not self._fill()
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self):
        self.raw.close()
        super().close()


def open_utf8(path: Path, encoding: str = "auto") -> tuple[io.BufferedReader, str]:
    """(binary stream of UTF-8 bytes with \\n line ends, the encoding the file was read as)."""
    raw = open_raw(path)
    try:
        head, early = read_upto(raw, SNIFF_BYTES)  # in pieces, so that a damaged file keeps its start
        if early is not None and not head:
            # damaged from its first byte (or not compressed as its first bytes say): nothing to
            # keep, and no rows "above" to speak of; the file cannot be read at all
            raise EncodingError(f"cannot be decompressed from its first byte ({type(early).__name__}: "
                                f"{early}): it is damaged or not {compression_of(path)} data; re-download "
                                "or re-compress the file")
        enc, skip = sniff_encoding(head, encoding, whole=early is None and len(head) < SNIFF_BYTES)
    except Exception:
        raw.close()
        raise
    enc = codecs.lookup(enc).name if enc != "utf-8" else enc
    if enc == "utf-8":
        probe = head[skip:]
    else:
        probe = codecs.decode(head[skip:skip + 4096 - (4096 % 4)], enc, "replace").encode("utf-8", "replace")
    lone_cr = b"\r" in probe and b"\n" not in probe
    if enc == "utf-8" and not lone_cr and early is None and isinstance(raw, io.BufferedReader) \
            and raw.seekable():
        # a plain UTF-8 file needs no transcoding: read it directly (no copies through
        # _Transcoded's buffers), past the byte-order mark, if any (seeking back over the
        # sniffed head, so only a file that can seek)
        raw.seek(skip)
        return raw, enc
    tr = _Transcoded(raw, enc, skip, lone_cr, head, encoding, name=str(path))
    if early is not None:
        tr.fail(early)
    stream = io.BufferedReader(tr, buffer_size=CHUNK)
    return stream, enc


def read_error(stream, rows: int | None = None) -> str | None:
    """Why ``stream`` (from ``open_utf8``) ended early, or None. ``rows``: how many rows the
    caller read before the end (the wording says whether rows were kept); by default, whether a
    whole line came before it."""
    tr = getattr(stream, "raw", None)
    if rows is not None and getattr(tr, "cause", None) is not None:
        return damage_reason(tr.cause, rows > 0)
    return getattr(tr, "error", None)


def damage_reason(e: Exception, kept: bool) -> str:
    """The quarantine reason for a compressed file that ends early with ``e``; ``kept``: rows
    were read before it (never said when none were). Bytes that end inside a character are not
    damage: their reason names the encoding."""
    if isinstance(e, EncodingMismatch):
        return str(e)
    if kept:
        return (f"the file is truncated or corrupt after the rows above ({type(e).__name__}: {e}); "
                "they were kept; re-download or re-compress the file to get the rest")
    return (f"the file is truncated or corrupt before its first whole row ({type(e).__name__}: {e}); "
            "no row could be read from it; re-download or re-compress the file")


def utf8_error_reason(line_no: int, raw: bytes, encoding: str) -> str:
    """Why a line is not text, and how to fix it."""
    try:
        raw.decode("utf-8")
        return f"line {line_no} is not valid text"
    except UnicodeDecodeError as e:
        at = e.start
    if encoding == "utf-8" and b"\x00" in raw:
        return (f"line {line_no} is not valid UTF-8 at byte {at} and has zero bytes, as UTF-16 text "
                "has; pass --encoding utf-16 (or the encoding it was saved in) or re-save the file as UTF-8")
    if encoding == "utf-8":
        return (f"line {line_no} is not valid UTF-8 at byte {at}; re-save the file as UTF-8 "
                "or pass --encoding cp1252 (or the encoding it was saved in)")
    return (f"line {line_no} has bytes that are not valid {encoding} at byte {at}; re-save the file "
            "as UTF-8 or pass the --encoding it was saved in")


def has_surrogates(s: str) -> bool:
    """Whether ``s`` holds lone surrogates (bytes that were not UTF-8, read with surrogateescape)."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
