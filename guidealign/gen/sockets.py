"""Where vLLM's engines put their IPC sockets: a directory of this process, gone when it exits.

vLLM binds each engine's ZMQ sockets as files in ``VLLM_RPC_BASE_PATH`` (the temp directory by
default) and leaves them there when the engine stops (7 files an engine with vLLM 0.32, measured:
on a node that runs many stages, thousands). ``build_llm`` points vLLM at :func:`socket_dir`
instead (unless ``VLLM_RPC_BASE_PATH`` is set): one directory a process, for all its engines,
removed when the process exits; the directories of processes that ended without removing theirs
(killed) are removed by the next process on the host that builds an engine. A socket's path
(directory + "/" + a uuid) must fit ZMQ's 107 bytes: the directory's name is short (a hash of the
host name) and it goes to /tmp or /dev/shm when the temp directory is too long a path.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = "gav-"  # short: a socket's path (directory + "/" + a uuid) must fit sun_path
_OLD_PREFIX = "guidealign-vllm-"  # before Stop 48: the host name itself (up to 40 characters)
_DIR: dict[int, Path | None] = {}  # pid -> this process's directory (a forked child makes its own)
# vLLM names each socket "<VLLM_RPC_BASE_PATH>/<uuid4>": 1 + 36 characters after the directory
_SOCKET_NAME = 37
# what mkdtemp adds after the prefix, and the longest pid (pid_max 4194304)
_RANDOM, _PID = 8, 7


# the longest IPC path ZMQ binds: sizeof(sockaddr_un.sun_path) - 1 on Linux (zmq.IPC_PATH_MAX_LEN)
_MAX_PATH = 107


def _host() -> str:
    return socket.gethostname()


def _name_prefix() -> str:
    # the host in the name, as a short hash: only this host's processes are asked whether they
    # still run (a name like ip-10-0-1-2.us-west-2.compute.internal left no room for the socket)
    return f"{PREFIX}{hashlib.blake2b(_host().encode(), digest_size=3).hexdigest()}-"


def _old_name_prefix() -> str:
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in _host())[:40]
    return f"{_OLD_PREFIX}{host}-"


def socket_base() -> Path | None:
    """The first of the temp directory, /tmp and /dev/shm where this process's socket directory
    leaves room for vLLM's socket names (a job's TMPDIR can be long), or None."""
    room = _MAX_PATH - _SOCKET_NAME - len(_name_prefix()) - _PID - 1 - _RANDOM - 1
    for base in (tempfile.gettempdir(), "/tmp", "/dev/shm"):
        if len(base) <= room and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return Path(base)
    return None


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
    for prefix in (_name_prefix(), _old_name_prefix()):
        for d in base.glob(prefix + "*"):
            pid = d.name[len(prefix):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
    return gone


def socket_dir() -> Path | None:
    """This process's directory for its engines' sockets (made on the first call, made again
    if something removed it; removed at exit), in :func:`socket_base`; None where no base
    leaves room for the sockets' names (then vLLM's own default applies)."""
    pid = os.getpid()
    if pid not in _DIR:
        base = socket_base()
        d = None
        if base is not None:
            remove_stale(base)
            d = Path(tempfile.mkdtemp(prefix=f"{_name_prefix()}{pid}-", dir=base))
            atexit.register(_remove, pid, d)
        _DIR[pid] = d
    d = _DIR[pid]
    if d is not None:
        d.mkdir(mode=0o700, exist_ok=True)
    return d


def _remove(pid: int, d: Path) -> None:
    if os.getpid() == pid:  # not from a forked child that exits normally
        shutil.rmtree(d, ignore_errors=True)
