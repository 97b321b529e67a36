"""shards: the storage layer.

A dataset is a directory of Parquet shards (``shard-00000.parquet`` ...) plus one
commit marker per shard (``shard-00000.done.json``). A shard exists for readers only
once its marker exists; the marker records rows, bytes, a checksum and the
fingerprint of the stage config and inputs that produced it.
"""
from guidealign.shards.layout import shard_path, marker_path, quarantine_path, shard_indices
from guidealign.shards.marker import Marker, read_marker, is_done
from guidealign.shards.write import write_shard, write_json_atomic
from guidealign.shards.read import iter_tables, iter_batches, read_table, committed, read_quarantine
from guidealign.shards.ranks import resolve_rank, my_shards
from guidealign.shards.fingerprint import fingerprint
from guidealign.shards.manifest import write_manifest, read_manifest, wait_complete
from guidealign.shards.stage import map_shards, StageReport

__all__ = [
    "shard_path", "marker_path", "quarantine_path", "shard_indices",
    "Marker", "read_marker", "is_done",
    "write_shard", "write_json_atomic",
    "iter_tables", "iter_batches", "read_table", "committed", "read_quarantine",
    "resolve_rank", "my_shards", "fingerprint",
    "write_manifest", "read_manifest", "wait_complete",
    "map_shards", "StageReport",
]
