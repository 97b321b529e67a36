"""An engine that does not start in engine.start_timeout_s: its processes go, the stage fails."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from engine_scripts import PRINT_PROCESSES_LEFT

SCRIPT = PRINT_PROCESSES_LEFT + textwrap.dedent("""
    import sys

    def main():
        from guidealign.config import load_config
        from guidealign.gen.engine import EngineStartTimeout, build_llm, close_llm

        cfg = load_config(None, ["engine.dtype=float32", "engine.max_model_len=512",
                                 "engine.start_timeout_s=" + sys.argv[1]]).engine
        try:
            close_llm(build_llm(cfg))
            print("started")
        except EngineStartTimeout as e:
            print("timed out:", e)
        print_processes_left()

    if __name__ == "__main__":
        main()
""")


def test_an_engine_that_does_not_start_in_time_is_killed_and_the_stage_fails(tmp_path):
    """vLLM waits for ever for an engine that neither starts nor dies (a tensor-parallel worker
    stuck in NCCL's setup), while the rank's heartbeat keeps beating, so no stall clock ends
    it. With ``engine.start_timeout_s`` the engine's processes are killed once it is up, and
    ``build_llm`` raises :class:`EngineStartTimeout` naming the setting. Here the real engine
    gets half a second (it needs several: the deadline falls before its processes exist, and
    they are killed as they appear); with no limit it starts."""
    script = tmp_path / "start.py"
    script.write_text(SCRIPT)
    for limit, want in (("0.5", "timed out: the vLLM engine"), ("0", "started")):
        out = subprocess.run([sys.executable, str(script), limit], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert want in out.stdout, out.stdout
        assert "engine.start_timeout_s" in out.stdout or want == "started"
        assert "engine processes left: 0" in out.stdout, out.stdout
