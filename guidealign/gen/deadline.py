"""``LLM.generate`` under ``engine.progress_timeout_s``: an engine that stops finishing requests
mid-generation is killed, and the stage fails, instead of the rank waiting for ever.

vLLM's offline ``LLM.generate`` waits on its engine core without a limit. A tensor-parallel
worker stuck in an NCCL collective (a lost peer, a wedged GPU) never answers, and the rank's
heartbeat thread beats meanwhile, so no other rank's stall clock ends the wait either: the
allocation idles until its time limit. Here the progress bar vLLM drives (``use_tqdm`` takes a
callable that builds one; it is told of every finished request) feeds a deadline
(``reaper.progress_deadline``): when no request finishes for ``engine.progress_timeout_s``, the
engine's processes are killed, vLLM raises in the waiting call, and this raises
:class:`EngineStalled` naming the setting. ``engine.start_timeout_s`` covers the start.
"""
from __future__ import annotations

import time


class EngineStalled(RuntimeError):
    """No request finished within ``engine.progress_timeout_s``; the engine's processes were killed."""


class _Finished:
    """What ``LLM.generate`` makes of its ``use_tqdm`` callable (duck-typed as the tqdm it
    expects), twice: a wrapper of the prompts it renders (``tqdm(iterable, desc=...)``) and the
    bar of its engine loop, which it ``update``s once a request finished (it also reads
    ``format_dict["elapsed"]`` and sets ``postfix``). Each rendered prompt and each update calls
    ``on_finish``: progress, for the deadline."""

    def __init__(self, on_finish, iterable=None, **_kw):
        self._on_finish = on_finish
        self._iterable = iterable
        self._t0 = time.monotonic()
        self.n = 0
        self.postfix = ""

    def __iter__(self):
        for item in self._iterable if self._iterable is not None else ():
            self._on_finish()
            yield item

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.monotonic() - self._t0, 1e-9), "n": self.n}

    def update(self, n: int = 1) -> None:
        self.n += n
        self._on_finish()

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def stalled_message(seconds: float) -> str:
    return (f"the vLLM engine finished no request for engine.progress_timeout_s={seconds:g} s "
            "(a tensor-parallel worker stuck in a collective, a wedged GPU); its processes were "
            "killed and the shard was not committed: rerun to resume. Raise engine.progress_timeout_s "
            "if single requests legitimately take longer (very long outputs on a slow engine).")


def _wake(llm, seconds: float) -> None:
    """Wake a ``generate`` waiting on the killed engine. vLLM 0.32's client notices the engine
    core's death and shuts its output thread down without a word to the queue its waiting
    call reads (``SyncMPClient.outputs_queue``), so the call would wait for ever: the error goes
    into that queue, where the call raises it."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    queue = getattr(core, "outputs_queue", None)
    if queue is not None:
        queue.put_nowait(EngineStalled(stalled_message(seconds)))


def watched_generate(llm, prompts: list, params):
    """``llm.generate(prompts, params)`` under the engine's progress deadline (set by
    ``build_llm`` from ``engine.progress_timeout_s``; an engine built otherwise has none)."""
    from guidealign.core import reaper

    generate = llm.generate  # a lazy wrapper (Ray's worker engine, eval's responder) starts its engine here
    # the LLM itself, also behind such a wrapper (it hands out the LLM's own bound method): its
    # private names stay the wrapper's, so they are read here
    engine = getattr(generate, "__self__", llm)
    seconds = float(getattr(engine, "_guidealign_progress_s", 0) or 0)
    procs = getattr(engine, "_guidealign_procs", None) or set()
    if seconds <= 0 or not procs:
        return generate(prompts, params, use_tqdm=False)
    with reaper.progress_deadline(seconds, procs, lambda: _wake(engine, seconds)) as (tick, expired):
        try:
            out = generate(prompts, params, use_tqdm=lambda *a, **kw: _Finished(tick, *a, **kw))
        except BaseException as e:
            if expired():
                raise EngineStalled(stalled_message(seconds)) from e
            raise
    if expired():  # killed just as its last request finished: the engine is gone all the same
        raise EngineStalled(stalled_message(seconds))
    return out
