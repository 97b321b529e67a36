"""An engine that stops finishing requests mid-generation: killed after engine.progress_timeout_s,
and the call fails instead of waiting for ever."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from engine_scripts import PRINT_PROCESSES_LEFT

SCRIPT = PRINT_PROCESSES_LEFT + textwrap.dedent("""
    import os, signal, time

    def main():
        from guidealign.config import load_config
        from guidealign.config.engine import Sampling
        from guidealign.gen.engine import EngineStalled, build_llm, close_llm, generate, sampling_params
        from guidealign.gen.scoring import score_prompts

        cfg = load_config(None, ["engine.dtype=float32", "engine.max_model_len=512",
                                 "engine.progress_timeout_s=600"]).engine
        llm = build_llm(cfg)
        print("deadline:", llm._guidealign_progress_s)
        params = sampling_params(Sampling(temperature=0.0, max_tokens=8), llm=llm)
        # under the deadline, as every stage generates: it finishes as before
        print("before:", [g.finish_reason for g in generate(llm, ["Say hi.", "Name a colour."], params)])
        tok = llm.get_tokenizer()
        ids = tok("Is the sky blue?")["input_ids"]
        score, err = score_prompts(llm, [ids], tok(" Yes")["input_ids"][-1:], tok(" No")["input_ids"][-1:])[0]
        print("score before:", 0.0 <= score <= 1.0, err)
        for pid, _ in llm._guidealign_procs:  # the engine hangs: nothing it runs makes progress
            os.kill(pid, signal.SIGSTOP)
        llm._guidealign_progress_s = 3
        t = time.monotonic()
        try:
            generate(llm, ["Say hi."], params)
            print("returned")
        except EngineStalled as e:
            print(f"stalled after {time.monotonic() - t:.0f} s:", e)
        close_llm(llm, timeout=30)
        print_processes_left()

    if __name__ == "__main__":
        main()
""")


def test_an_engine_that_stops_finishing_requests_is_killed_and_the_call_fails(tmp_path):
    """vLLM's ``LLM.generate`` waits for ever on an engine that stops mid-run (a tensor-parallel
    worker stuck in an NCCL collective), and vLLM 0.32's client, even once the engine core is
    dead, shuts its output thread down without waking the waiting call. Here the real engine is
    frozen (SIGSTOP) before a call: after ``engine.progress_timeout_s`` its processes are killed
    and ``generate`` raises :class:`EngineStalled` naming the setting. Before that, generation
    and the scoring pass run under the same deadline as they always did."""
    script = tmp_path / "stall.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deadline: 600" in out.stdout, out.stdout
    assert "before: ['length', 'length']" in out.stdout, out.stdout
    assert "score before: True None" in out.stdout, out.stdout  # a probability, no error
    assert "stalled after" in out.stdout and "engine.progress_timeout_s=3" in out.stdout, out.stdout
    assert "returned" not in out.stdout
    assert "engine processes left: 0" in out.stdout, out.stdout


def test_the_progress_bar_vllm_drives_reports_each_finished_request_and_rendered_prompt():
    """``LLM.generate`` calls its ``use_tqdm`` callable twice: to wrap the prompts it renders and
    for the bar it updates per finished request (reading ``format_dict["elapsed"]``)."""
    from guidealign.gen.deadline import _Finished

    ticks = []
    rendered = list(_Finished(lambda: ticks.append("r"), ["a", "b"], desc="Rendering prompts"))
    assert rendered == ["a", "b"] and ticks == ["r", "r"]
    bar = _Finished(lambda: ticks.append("f"), total=3, desc="Processed prompts", postfix="")
    bar.update(2)
    bar.postfix = "est. speed"
    assert bar.n == 2 and ticks[-1] == "f" and bar.format_dict["elapsed"] > 0
    bar.refresh()
    bar.close()


def test_a_progress_deadline_kills_its_processes_and_wakes_the_waiter_when_nothing_moves():
    """``reaper.progress_deadline``: with no ``tick`` the processes are killed and ``on_expire``
    runs; with no limit nothing is touched."""
    import subprocess as sp

    from guidealign.core import reaper

    import psutil

    def own(proc):  # this process only: the test process's other children (a session-wide
        return {(proc.pid, psutil.Process(proc.pid).create_time())}  # engine) are not the block's

    p = sp.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    procs = own(p)
    woken = []
    with reaper.progress_deadline(0.5, procs, lambda: woken.append(True)) as (tick, expired):
        assert p.wait(timeout=60) != 0  # killed, not finished
    assert expired() and woken == [True]
    q = sp.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    with reaper.progress_deadline(0, own(q), lambda: woken.append(True)) as (tick, expired):
        assert q.wait(timeout=60) == 0
    assert not expired() and woken == [True]
