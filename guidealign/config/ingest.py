"""The `ingest` section: how input files become prompt shards."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestConfig:
    # Name of the field (JSON key or column) that holds the prompt; matched ignoring case and
    # surrounding spaces ("Prompt", " prompt ", "PROMPT" all match "prompt").
    prompt_field: str = "prompt"
    # Other spellings tried, in order, when a row/file has no `prompt_field` (common exports).
    prompt_aliases: list[str] = field(default_factory=lambda: ["question", "instruction", "text"])
    # Prompts longer than this many characters are quarantined.
    max_chars: int = 100_000
    # Rows per output shard: the unit of work, resume and rank split downstream.
    shard_rows: int = 10_000
    # Text encoding of the inputs: "auto" = BOM / UTF-16 / UTF-8, or cp1252 for a file whose
    # start is not UTF-8 and has no multi-byte UTF-8 at all; else any Python codec name.
    encoding: str = "auto"
    # CSV delimiter: "auto" sniffs , ; TAB | from the header line (.tsv files: TAB).
    delimiter: str = "auto"
    # Bytes of JSONL parsed per columnar block (memory per block is a few times this).
    block_bytes: int = 8 << 20
    # Prompt hashing: "hashlib" (a Python loop), "numba" (a compiled blake2b, same ids, all cores;
    # needs numba), or "auto" = numba when installed and the inputs total >= 64 MiB (the first
    # run on a machine compiles it for ~10-60 s; later runs load it from numba's cache).
    hash_kernel: str = "auto"
    # Input files for `guidealign ingest` when none are given on the command line.
    inputs: list[str] = field(default_factory=list)
