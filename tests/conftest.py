"""Shared fixtures. One real vLLM engine per test session (float32, so greedy output is
deterministic); tests that need it take the ``llm`` fixture."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO.parent / "shared" / "benchmarks"

# Tests never reach a hub: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# each pytest-xdist worker computes on its own core(s): tests/cores.py
from cores import pin_xdist_worker  # noqa: E402

pin_xdist_worker()

# torch loaded once here, after the pin, so its thread count now is its default for this worker
# (what `_torch_threads_kept` puts back after each test)
import torch  # noqa: E402

TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A test that set torch's thread count (``torch.set_num_threads(1)``, a stage's ``threads``)
    left it to every later test of its worker, and to ``core.threads``' record of torch's
    default: ``threads: 0`` then meant that count. Both are put back after each test."""
    from guidealign.core import threads

    default = threads._default
    yield
    torch.set_num_threads(TORCH_THREADS)
    threads._default = default


def engine_config(**over):
    from guidealign.gen.engine import EngineConfig

    base = dict(dtype="float32", max_model_len=2048, max_num_seqs=32, seed=0)
    base.update(over)
    return EngineConfig(**base)


@pytest.fixture(scope="session")
def generator_path() -> str:
    from guidealign.core.models import prepare_generator

    return str(prepare_generator())


@pytest.fixture(scope="session")
def embedder_path() -> str:
    from guidealign.core.models import embedder_dir

    return str(embedder_dir())


# os.environ just before and just after the session engine started (tests/test_engine_isolation.py)
ENV_BEFORE_ENGINE: dict = {}
ENV_AFTER_ENGINE: dict = {}


@pytest.fixture(scope="session")
def llm(generator_path):
    """The real vLLM engine on the embedded SmolLM2 (float32, eager, prefix caching on)."""
    from guidealign.gen.engine import build_llm, close_llm

    ENV_BEFORE_ENGINE.update(os.environ)
    ENV_BEFORE_ENGINE.pop("PYTEST_CURRENT_TEST", None)
    engine = build_llm(engine_config(model=generator_path))
    ENV_AFTER_ENGINE.update(os.environ)
    ENV_AFTER_ENGINE.pop("PYTEST_CURRENT_TEST", None)
    yield engine
    close_llm(engine)


@pytest.fixture
def workdir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


# The longest modules (each several minutes here: whole pipeline runs, engines, clusters),
# longest first. They are started first, so that on two pytest-xdist workers (CI: ``-n 2
# --dist loadfile --no-loadscope-reorder``) the short ones fill in around them instead of a
# long one starting last. Only the order changes: no test depends on it.
LONGEST_FIRST = ("test_chaos", "test_e2e", "test_paper_twin", "test_slurm", "test_sft",
                 "test_gen_stages", "test_ray_engine")


def pytest_collection_modifyitems(config, items):
    """The longest modules first (LONGEST_FIRST), then the rest in the order pytest collects.

    GUIDEALIGN_TEST_ORDER=reverse | shuffle:SEED runs the suite in another order (modules
    reordered, and the tests inside each module), to prove that no test depends on another
    having run first."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module.__name__.rpartition(".")[2], []).append(item)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    groups = [modules[k] for k in sorted(modules, key=lambda k: rank.get(k, len(rank)))]
    order = os.environ.get("GUIDEALIGN_TEST_ORDER", "")
    if not order:
        items[:] = [i for g in groups for i in g]
        return
    import random

    if order == "reverse":
        groups = [g[::-1] for g in groups[::-1]]
    elif order.startswith("shuffle:"):
        rng = random.Random(int(order.split(":", 1)[1]))
        rng.shuffle(groups)
        for g in groups:
            rng.shuffle(g)
    else:
        raise pytest.UsageError(f"GUIDEALIGN_TEST_ORDER={order!r}: use reverse or shuffle:SEED")
    items[:] = [i for g in groups for i in g]


def pytest_sessionfinish(session, exitstatus):
    """Free what the tests left behind while every module is still whole: objects of FAISS,
    torch, tokenizers and llvmlite collected later, during interpreter teardown, run their
    native destructors against half-finalized modules. The one CI run that segfaulted (exit 139)
    did so after "519 passed", i.e. here or later; the runner starts Python with
    ``-X faulthandler`` so such a crash prints every thread's stack. Threads still running now
    are named on stderr for the same reason."""
    import gc
    import sys
    import threading

    gc.collect()
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if alive:
        print(f"\nthreads still running at the end of the session: {', '.join(sorted(alive))}",
              file=sys.stderr)


# Disk: a run of the suite wrote 11 GB under /tmp when every test's folder was kept to the end
# (a CI machine ran out of space). pyproject sets tmp_path_retention_policy = "failed": a test's
# tmp_path goes when it passes. Module fixtures take ``module_tmp`` in place of
# ``tmp_path_factory``: their folders go when the module ends, unless one of its tests failed.
FAILED_MODULES: set[str] = set()
PEAK_GB = 3  # the suite's peak under the temp folder: at most 3.0 GB measured (README "Tests")
FREE_GB_WANTED = 5  # with room for the rest of the machine


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``tmp_path_factory`` for a module fixture: ``module_tmp.mktemp(name)``; the folders are
    removed when the module's tests are done, and kept when one of them failed."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield SimpleNamespace(mktemp=mktemp)
    if request.module.__name__ not in FAILED_MODULES:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def pytest_sessionstart(session):
    """Say at once when the temp folder has too little room for the suite, instead of failing
    tests one by one with "No space left on device" (which a CI run did)."""
    import sys
    import tempfile

    if hasattr(session.config, "workerinput"):  # once, in the controller
        return
    where = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    free = shutil.disk_usage(where).free / 2**30
    if free < FREE_GB_WANTED:
        print(f"\nwarning: {free:.1f} GB free under {where}; the suite needs about "
              f"{PEAK_GB} GB at its peak, so tests may fail with 'No space left on device'",
              file=sys.stderr)


@pytest.fixture(scope="module")
def tok(generator_path):
    """The embedded generator's tokenizer (what the stage functions get from the engine)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(generator_path)
