"""Where vLLM's engines put their IPC sockets: a directory of this process, gone when it exits.

vLLM binds each engine's ZMQ sockets as files in ``VLLM_RPC_BASE_PATH`` (the temp directory by
default) and leaves them there when the engine stops (7 files an engine with vLLM 0.32, measured:
on a node that runs many stages, thousands). ``build_llm`` points vLLM at :func:`socket_dir`
instead (unless ``VLLM_RPC_BASE_PATH`` is set): one directory a process, for all its engines,
removed when the process exits; the directories of processes that ended without removing theirs
(killed) are removed by the next process on the host that builds an engine.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = "guidealign-vllm-"
_DIR: dict[int, Path] = {}  # pid -> this process's directory (a forked child makes its own)


def _name_prefix() -> str:
    # the host in the name: only this host's processes are asked whether they still run
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:40]
    return f"{PREFIX}{host}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(base: str | Path | None = None) -> list[Path]:
    """Remove this host's socket directories whose process no longer runs; returns them."""
    base = Path(base or tempfile.gettempdir())
    gone = []
    for d in base.glob(_name_prefix() + "*"):
        pid = d.name[len(_name_prefix()):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def socket_dir() -> Path:
    """This process's directory for its engines' sockets (made on the first call, made again
    if something removed it; removed at exit)."""
    pid = os.getpid()
    d = _DIR.get(pid)
    if d is None:
        remove_stale()
        d = Path(tempfile.mkdtemp(prefix=f"{_name_prefix()}{pid}-"))
        _DIR[pid] = d
        atexit.register(_remove, pid, d)
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _remove(pid: int, d: Path) -> None:
    if os.getpid() == pid:  # not from a forked child that exits normally
        shutil.rmtree(d, ignore_errors=True)
