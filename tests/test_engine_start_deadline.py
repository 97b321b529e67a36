"""An engine that does not start in engine.start_timeout_s: its processes go, the stage fails.
And where an engine's IPC sockets go (a directory of the process, gone when it exits)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from engine_scripts import PRINT_PROCESSES_LEFT

SCRIPT = PRINT_PROCESSES_LEFT + textwrap.dedent("""
    import sys

    def main():
        from guidealign.config import load_config
        from guidealign.gen.engine import EngineStartTimeout, build_llm, close_llm
        from guidealign.gen.sockets import socket_dir

        cfg = load_config(None, ["engine.dtype=float32", "engine.max_model_len=512",
                                 "engine.start_timeout_s=" + sys.argv[1]]).engine
        try:
            llm = build_llm(cfg)
            print("sockets while up:", len([p for p in socket_dir().iterdir() if p.is_socket()]))
            close_llm(llm)
            print("started")
        except EngineStartTimeout as e:
            print("timed out:", e)
        print_processes_left()
        print("socket dir:", socket_dir())

    if __name__ == "__main__":
        main()
""")


@pytest.fixture(scope="module")
def runs(module_tmp):
    """The script with a start limit of half a second, and with none: {limit: its output}."""
    script = module_tmp.mktemp("engine") / "start.py"
    script.write_text(SCRIPT)
    return {limit: subprocess.run([sys.executable, str(script), limit], capture_output=True, text=True,
                                  timeout=600) for limit in ("0.5", "0")}


def test_an_engine_that_does_not_start_in_time_is_killed_and_the_stage_fails(runs):
    """vLLM waits for ever for an engine that neither starts nor dies (a tensor-parallel worker
    stuck in NCCL's setup), while the rank's heartbeat keeps beating, so no stall clock ends
    it. With ``engine.start_timeout_s`` the engine's processes are killed once it is up, and
    ``build_llm`` raises :class:`EngineStartTimeout` naming the setting. Here the real engine
    gets half a second (it needs several: the deadline falls before its processes exist, and
    they are killed as they appear); with no limit it starts."""
    for limit, want in (("0.5", "timed out: the vLLM engine"), ("0", "started")):
        out = runs[limit]
        assert out.returncode == 0, out.stderr[-3000:]
        assert want in out.stdout, out.stdout
        assert "engine.start_timeout_s" in out.stdout or want == "started"
        assert "engine processes left: 0" in out.stdout, out.stdout


def test_an_engines_sockets_go_to_a_directory_of_its_process_removed_when_it_exits(runs):
    """vLLM binds an engine's ZMQ sockets as files in the temp directory and leaves them there
    (7 an engine, measured); ``build_llm`` has them made in ``sockets.socket_dir``, which goes
    when the process exits, after a normal start and close as after a killed start."""
    up = re.search(r"sockets while up: (\d+)", runs["0"].stdout)
    assert up and int(up[1]) > 0, runs["0"].stdout  # vLLM used the directory
    for limit, out in runs.items():
        d = re.search(r"socket dir: (\S+)", out.stdout)
        assert d, out.stdout + out.stderr[-2000:]
        assert Path(d[1]).name.startswith("gav-")
        assert not Path(d[1]).exists(), f"left behind after the run with limit {limit}"


def test_the_socket_directories_of_ended_processes_on_this_host_are_removed(tmp_path, monkeypatch):
    """A killed process cannot remove its directory: the next one that builds an engine does,
    for processes of this host that no longer run, and never a running one's."""
    from guidealign.gen import sockets

    monkeypatch.setattr(sockets.tempfile, "gettempdir", lambda: str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = tmp_path / f"{sockets._name_prefix()}{ended.stdout.strip()}-abc"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"{sockets._name_prefix()}{running.pid}-def"
        other_host = tmp_path / f"{sockets.PREFIX}another-host-{ended.stdout.strip()}-ghi"
        for d in (dead, live, other_host):
            d.mkdir()
            (d / "sock").write_text("")
        assert sockets.remove_stale() == [dead]
        assert not dead.exists() and live.exists() and other_host.exists()
    finally:
        running.kill()
        running.wait()


@pytest.mark.parametrize("tmp_len", [41, 90])
def test_an_engines_socket_paths_fit_zmq_with_a_long_host_name_and_temp_dir(tmp_path, monkeypatch, tmp_len):
    """vLLM binds "<VLLM_RPC_BASE_PATH>/<uuid4>", at most 107 bytes: the directory held the host
    name (EC2's ip-10-0-123-45.us-west-2.compute.internal), and no engine started there."""
    import uuid

    import zmq

    from guidealign.gen import sockets

    monkeypatch.setattr(sockets, "_host", lambda: "ip-10-0-123-45.us-west-2.compute.internal")
    top = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # pytest's tmp_path alone is longer
    long_tmp = top / ("x" * (tmp_len - len(str(top)) - 1))
    long_tmp.mkdir()
    assert len(str(long_tmp)) == tmp_len
    monkeypatch.setattr(sockets.tempfile, "gettempdir", lambda: str(long_tmp))
    monkeypatch.setattr(sockets, "_DIR", {})
    d = sockets.socket_dir()
    try:
        assert d is not None and d.parent == (long_tmp if tmp_len <= 42 else Path("/tmp"))
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        try:
            sock.bind(f"ipc://{d}/{uuid.uuid4()}")  # raised ZMQError: path longer than 107
        finally:
            sock.close(linger=0)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)


def test_socket_directories_named_as_before_are_removed_when_their_process_ended(tmp_path, monkeypatch):
    from guidealign.gen import sockets

    monkeypatch.setattr(sockets.tempfile, "gettempdir", lambda: str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    old = tmp_path / f"{sockets._old_name_prefix()}{ended.stdout.strip()}-abc"
    old.mkdir()
    assert sockets.remove_stale() == [old]
