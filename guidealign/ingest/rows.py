"""What every row reader of ingest yields, and the error for an input that cannot be read."""
from __future__ import annotations

# (line, row or item number, the record or None, the quarantine reason or None)
Row = tuple[int, dict | None, str | None]


class IngestError(Exception):
    """A whole input cannot be read; raised before any work starts."""
