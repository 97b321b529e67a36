"""The ingest run's fingerprint (``files_fingerprint``): which files, at which size and time, read
with which settings and by which version of the readers. Kept in the dataset's manifest: a run
with the same fingerprint finds the dataset done, another one writes it again."""
from __future__ import annotations

from pathlib import Path

from guidealign.config.ingest import IngestConfig
from guidealign.ingest.encodings import inner_suffix
from guidealign.shards import fingerprint


def files_fingerprint(files: list[Path], cfg: IngestConfig) -> str:
    """What an ingest of ``files`` with ``cfg`` writes in its manifest: a later run with the same
    fingerprint finds the dataset done. Each term below names a change of the rows some inputs
    give, and only inputs of the kinds it changes carry it, so runs over other inputs keep
    their fingerprint (and no later stage redoes a shard)."""
    # v7: mtime in nanoseconds (a file rewritten with the same size within the same second was
    # taken as already ingested); the shards of the same input come out byte for byte the same,
    # so after the upgrade ingest runs once more and no later stage redoes a shard
    # The resolved path says which file it is (the same relative path from another directory is
    # another file); the path as written is what ``source`` says, so another spelling of the
    # same file is another run (its shards rewritten, not mixed with the earlier spelling's). A
    # path written as it resolves adds nothing: that run keeps the fingerprint it had.
    stats = [(str(p.resolve()), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
             + (() if str(p) == str(p.resolve()) else (str(p),)) + _inner_stats(p) for p in files]
    # the kinds of input the terms below are for (None: a saved dataset, a directory)
    kinds = {inner_suffix(p) if p.is_file() else None for p in files}
    json_in, csv_in = ".json" in kinds, bool(kinds & {".csv", ".tsv"})
    text_in = bool(kinds - {None, ".parquet"})  # every file input but Parquet
    arrow_in = bool(kinds & {None, ".parquet"})  # Parquet files and saved datasets
    # v8: an instruction's input (ingest.instruction_inputs) is part of its prompt; shards
    # without one come out the same, so only inputs with instruction + input change downstream
    # JSON (not JSON Lines) files since Stop 48: records after leading nulls in an array ({"data":
    # [null, {...}, ...]}) are read, and an object holding arrays of records is said; runs
    # without a .json input keep their fingerprint
    json_v2 = ["json-array-v2"] if json_in else []
    # CSV (Stop 49): a record over several lines is numbered by its first line in `source`, not
    # its last; where no record spans lines, the shards come out the same (nothing downstream redone)
    csv_v2 = ["csv-first-line"] if csv_in else []
    # ingest.shard_cut=content (Stop 49) cuts other shards; position keeps the fingerprint it had
    cut = ["shard-cut-content-v1"] if cfg.shard_cut == "content" else []
    # Stop 50: metadata is strict JSON (a NaN or infinite float written as null, not as a bare
    # NaN/Infinity), and a quarantined row's undecodable bytes show as \udcXX escapes.
    # Any input but CSV (whose values are text) may hold such values: ingest runs once more, and
    # only shards that hold them come out different (only those are redone downstream); CSV-only
    # runs keep their fingerprint
    strict = ["metadata-strict-json-v1"] if kinds - {".csv", ".tsv"} else []
    # Stop 51: a prompt of blank space, control and format characters only (zero-width spaces)
    # is quarantined as empty, and an instruction or input of such characters holds no text to
    # join (``visible``): ingest runs once more; inputs without such prompts come out the same,
    # with them the shards from the first such row on change (``shard_cut: position``; under
    # ``content`` only the shards around it)
    # Stop 53 (line pairing, -NaN/Inf, CR LF after lone CR; README): text inputs once more, same if well-formed
    lines = ["line-pairing-v1"] if text_in else []
    # Stop 54 (JSON files, README): an item whose brackets do not close ends at the next item that
    # reads (the items after it were lost), scalars before an array's first object are passed
    # over (the array was taken for a field), JSON Lines saved as .json whose first line is long
    # is read as such when that line is broken or the next is not an object, a one-record object
    # without a prompt but with records nested deeper says so
    json_v3 = ["json-array-v3"] if json_in else []
    # Stop 54 (Parquet, saved datasets): a binary value inside a list or struct is written in
    # metadata as its text, as a binary column's is (it was Python's b'...' repr)
    nested_bytes = ["nested-binary-text-v1"] if arrow_in else []
    # Stop 54 (CSV, README): a quote left open that closes lines later quarantines its line only,
    # a short row is quarantined though it reaches another prompt alias, Excel's "sep=;" line
    # names the delimiter, a quarantined row's raw text is the line as written
    csv_v3 = ["csv-v3"] if csv_in else []
    # Stop 54 (every text input): a file under the 64 KiB sniff that ends inside a UTF-8
    # character is not taken for UTF-8 cut by the sample (cp1252 with its last byte non-ASCII)
    whole = ["sniff-whole-file-v1"] if text_in else []
    # Stop 56 (``chat``): a conversation of one user turn (``messages``, ``conversations``, or a
    # prompt field holding turns) is that turn's prompt (it was quarantined); inputs that may hold
    # lists (all but CSV) run once more, shards without conversations come out the same
    chat = ["chat-turns-v1"] if kinds - {".csv", ".tsv"} else []
    # Stop 57 (JSON files): an object that is one conversation (``{"messages": [...]}``) is one
    # record (its turns were read as records, each quarantined), also on JSON Lines of
    # conversations saved as .json whose first line is long
    json_chat = ["json-chat-object-v1"] if json_in else []
    # Stop 57 (CSV): a header line that names no prompt column is a quarantine row of its own (a
    # file without a header lost its first line without a word), and a record that repeats the
    # header line (files joined with their headers) is quarantined, not taken for a prompt
    csv_header = ["csv-header-v1"] if csv_in else []
    return fingerprint("ingest-v8", cfg.prompt_field, list(cfg.prompt_aliases), cfg.max_chars,
                       cfg.shard_rows, cfg.encoding, cfg.delimiter, list(cfg.instruction_inputs), stats,
                       *json_v2, *csv_v2, *cut, *strict, "prompt-has-text-v1", *lines, *json_v3,
                       *nested_bytes, *csv_v3, *whole, *chat, *json_chat, *csv_header)


def _inner_stats(p: Path) -> tuple:
    """For a directory (a saved `datasets` dataset): each file under it, with its size and
    mtime. ``save_to_disk`` over the same directory rewrites its files in place, which leaves
    the directory's own mtime as it was; a file's stat says nothing more (no entry: its
    fingerprint stays the one it had)."""
    if not p.is_dir():
        return ()
    inner = sorted(q for q in p.rglob("*") if q.is_file())
    return (tuple((q.relative_to(p).as_posix(), q.stat().st_size, q.stat().st_mtime_ns) for q in inner),)
