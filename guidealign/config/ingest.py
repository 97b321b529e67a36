"""The `ingest` section: how input files become prompt shards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Keys with a fixed set of values: the stage code takes its allowed values from these
# (typing.get_args), so the loader and the stage check one list.
HashKernel = Literal["auto", "llvm", "hashlib"]
ShardCut = Literal["position", "content"]


@dataclass
class IngestConfig:
    # Name of the field (JSON key or column) that holds the prompt; matched ignoring case and
    # surrounding spaces ("Prompt", " prompt ", "PROMPT" all match "prompt").
    prompt_field: str = "prompt"
    # Other spellings tried, in order, when a row/file has no `prompt_field` (common exports).
    # A row with none of them may hold a chat conversation (`messages`, `conversations`,
    # `conversation`: turns with role/content or from/value); one of a single user turn is that
    # turn's prompt, others are quarantined (guidealign/ingest/chat.py). So is the prompt field
    # itself when it holds such turns (TRL's conversational prompts).
    prompt_aliases: list[str] = field(default_factory=lambda: ["question", "instruction", "text"])
    # When the prompt comes from an `instruction` field, the first of these fields present with
    # text is joined to it after a blank line (Alpaca's `input`, Dolly's `context`: "Summarize
    # this." alone is not the prompt, and rows sharing it were dropped as duplicates). The field
    # stays in the row's metadata too. [] takes the instruction alone.
    instruction_inputs: list[str] = field(default_factory=lambda: ["input", "context"])
    # Prompts longer than this many characters are quarantined.
    max_chars: int = 100_000
    # Rows per output shard: the unit of work, resume and rank split downstream. Measured on
    # 1M JSONL rows (2 cores, local disk): 50k-row shards ingest only ~5-10% faster than 10k
    # (per-shard cost: one Parquet file, a marker, their fsyncs), while downstream stages want
    # enough shards to spread over ranks and small enough ones to resume, so 10k stays.
    shard_rows: int = 10_000
    # Where one shard ends and the next begins. "position": every `shard_rows` kept rows.
    # "content": after a kept row whose prompt hash hits a fixed pattern (at least half of
    # `shard_rows` in, at most 4x; `shard_rows` on average), so a row kept or dropped anew
    # (a quarantined line fixed in place, a prompt edited into a duplicate) changes only its own
    # shard (rarely its neighbour too) and the later shards come out byte for byte the same:
    # the generation stages keep their work on them. Worth it for large inputs that may be fixed
    # and ingested again (the GPU recipes set it); a row inserted or deleted still renumbers
    # the later lines in `source`, which changes those shards either way.
    shard_cut: ShardCut = "position"
    # Text encoding of the inputs: "auto" = BOM / UTF-16 / UTF-8, or cp1252 for a file whose
    # start is not UTF-8 and has no multi-byte UTF-8 at all; else any Python codec name.
    encoding: str = "auto"
    # CSV delimiter: "auto" sniffs , ; TAB | from the header line (.tsv files: TAB).
    delimiter: str = "auto"
    # Bytes of JSONL/CSV parsed per columnar block (memory per block is a few times this; three
    # blocks are in flight). 4 MiB: as fast as 8 MiB on 1M rows and ~60 MiB less peak RSS.
    block_bytes: int = 4 << 20
    # Prompt hashing (every kernel gives the same ids): "hashlib" (a Python loop, ~1 us a prompt,
    # holding the GIL), "llvm" (blake2b compiled with llvmlite: ~0.3 us a prompt, beside the
    # other threads; the first run on a machine compiles it in ~0.3 s and caches it, as a shared
    # library where `ld` is on PATH: ~3 ms to load then, ~35 ms through llvmlite's JIT; JSONL blocks are then scanned for line ends by compiled code too, ~15x numpy's
    # speed, and a block of flat objects (string and integer values) is read by compiled code,
    # ~3.5x pyarrow.json's speed; the same results either way), or
    # "auto" = llvm when llvmlite is installed and the inputs total >= 16 MiB, else hashlib.
    hash_kernel: HashKernel = "auto"
    # MiB (>= 1) for the newest distinct prompts' 8-byte hashes (exact de-duplication); older ones
    # move to sorted runs in anonymous temp files in the run directory (8 bytes a prompt on disk,
    # 16 while two runs merge), so memory stays flat but for a bit filter of 1-3 bytes a distinct
    # prompt. 8 MiB: 1M prompts stay in memory; 10M prompts then hold ~20 MiB in memory instead
    # of 76 (`bench/dedup.py`).
    dedup_memory_mib: int = 8
    # Input files for `guidealign ingest` when none are given on the command line.
    inputs: list[str] = field(default_factory=list)
