"""Reading small JSON records that other nodes replace by rename, on a shared file system.

On NFS a file replaced by a rename on another client between this client's lookup and its read
fails the read with ESTALE ("stale file handle"); looking the path up again finds the new file.
Every rank polls the manifests and completion records of the stages it waits on while the
ranks that own them rewrite them, so one such read must not end the run.
"""
from __future__ import annotations

import errno
import time
from pathlib import Path


def read_text(path: Path, tries: int = 5, pause: float = 0.2) -> str:
    """``path.read_text()``, read again (up to ``tries`` times, ``pause`` s apart) after ESTALE;
    other errors (a missing file) as they are."""
    for _ in range(tries - 1):
        try:
            return path.read_text()
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise
            time.sleep(pause)
    return path.read_text()
