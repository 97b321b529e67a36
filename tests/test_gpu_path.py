"""The GPU path's safety rails, checked on the CPU with real components:

- a worker that inherited torchrun-style variables (LOCAL_RANK, RANK, WORLD_SIZE) trains the
  retriever as one process (real sentence-transformers training on the embedded MiniLM);
- the FAISS GPU probe falls back to CPU FAISS with a reason (here: no GPU build, a cloner
  that raises "no kernel image", one that returns wrong neighbours, a probe child that
  aborts, fails or hangs), and ``use_gpu: true`` refuses to fall back silently; a search past
  FAISS GPU's k limit stays on the CPU;
- GPUs visible but unusable by torch is a loud error;
- ``models fetch`` lists a recipe's Hub models, skips local ones, and says clearly what is
  missing when the Hub is offline;
- ``run.sh setup`` refuses to install one extra over the other, and ``run.sh launch`` never
  installs.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                          "CUDA_VISIBLE_DEVICES")}


def guidealign(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidealign", *args], cwd=REPO,
                          env={**CLEAN_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)  # a hang guard, not a timing check


# --- the retriever trains in one process whatever the environment says -------------------

@pytest.mark.slow
def test_retriever_trains_in_one_process_with_torchrun_variables_set(workdir):
    from guidealign.config import load_config
    from guidealign.retrieval.library import run_library
    from synthetic import coded_guideline_rows, write_guideline_shards

    write_guideline_shards(workdir / "guidelines", coded_guideline_rows(6, 4, seed=3), shard_rows=32)
    sets = ["library.heldout_fraction=0.25", "retriever.epochs=1", "retriever.batch_size=8",
            "retriever.max_seq_length=32", "retriever.threads=1", "retriever.max_eval_queries=8"]
    run_library(load_config(overrides=sets), workdir, progress=False)
    # what a worker of a 4-process torchrun (or an old `launch`) would carry; rank 2 of 4 with
    # a rendezvous nobody else joins: accelerate would wait for it or fail
    env = {"LOCAL_RANK": "2", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29591", "HF_HUB_OFFLINE": "1"}
    args = ["-v", "train-retriever", "-w", str(workdir), "--rank", "0", "--world-size", "1",
            "--no-progress"]
    for s in sets:
        args += ["--set", s]
    p = guidealign(*args, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    done = json.loads((workdir / "retriever" / "_done.json").read_text())
    assert done["steps"] > 0 and done["train_pairs"] > 0
    assert "removed RANK, WORLD_SIZE, LOCAL_RANK" in p.stderr


# --- FAISS on the GPU only where a probe search works -------------------------------------

def _flat(n=64, d=16, seed=1):
    import faiss

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    return index, x


def test_faiss_probe_on_this_machine_falls_back_to_cpu_with_a_reason(monkeypatch, caplog):
    import guidealign.retrieval.faiss_gpu as ri

    monkeypatch.setattr(ri, "_PROBE", None)
    index, x = _flat()
    with caplog.at_level(logging.INFO, logger="guidealign.retrieval.faiss_gpu"):
        assert ri.to_gpus(index, "flat", "auto") is index  # searched on the CPU
    res = ri.probe_gpus()
    assert not res.ok and "FAISS sees no GPU" in res.reason
    # faiss-cpu is the gpu extra's FAISS: said, but not as a warning on every GPU node's library
    # and index (it was, on an H200 node); a faiss-gpu build that fails its probe still warns
    said = [r for r in caplog.records if "FAISS GPU probe: FAISS sees no GPU" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert ri.num_gpus("auto") == 0 and ri.num_gpus(False) == 0
    with pytest.raises(RuntimeError, match="use_gpu is true but FAISS cannot search on the GPUs"):
        ri.to_gpus(index, "flat", True)
    with pytest.raises(ValueError, match="use_gpu must be"):
        ri.num_gpus("sometimes")


def test_faiss_probe_compares_gpu_answers_with_the_cpu(monkeypatch):
    import faiss

    import guidealign.retrieval.faiss_gpu as ri

    def no_kernel(index, n):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    def wrong(index, n):  # a "GPU" index that answers for other vectors
        other, _ = _flat(n=index.ntotal, d=index.d, seed=99)
        return other

    res = ri.probe_gpus(clone=no_kernel, n=2)
    assert not res.ok and "no kernel image" in res.reason and res.gpus == 2
    res = ri.probe_gpus(clone=wrong, n=1)
    assert not res.ok and "other neighbours" in res.reason
    res = ri.probe_gpus(clone=lambda index, n: faiss.clone_index(index), n=1)
    assert res.ok and res.gpus == 1
    # only a passed probe sends an index to the cloner
    index, x = _flat()
    monkeypatch.setattr(ri, "_PROBE", ri.GpuProbe(False, 2, "no kernel image"))
    assert ri.to_gpus(index, "flat", "auto", clone=lambda i, n: pytest.fail("cloned")) is index
    monkeypatch.setattr(ri, "_PROBE", ri.GpuProbe(True, 2, "matched"))
    seen = []
    assert ri.to_gpus(index, "flat", "auto", clone=lambda i, n: seen.append(n) or i) is index
    assert seen == [2]
    assert ri.to_gpus(index, "hnsw", "auto", clone=lambda i, n: pytest.fail("hnsw cloned")) is index


def test_faiss_probe_runs_in_a_child_that_may_die(monkeypatch, caplog):
    """FAISS reports a CUDA error (a "no kernel image") through an assertion that aborts the
    process: the probe's search runs in a child, and a child that aborts, fails or hangs is a
    failed probe, with this process alive to search on the CPU."""
    import guidealign.retrieval.faiss_gpu as fg

    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # as `run.sh test` sets it: no stack dump as the reason
    died = fg.probe_in_child(2, argv=[sys.executable, "-c", (
        "import os, sys; sys.stderr.write('Faiss assertion err__ == cudaSuccess failed: CUDA error "
        "209 no kernel image is available\\n'); sys.stderr.flush(); os.abort()")])
    assert not died.ok and died.gpus == 2
    assert "was killed by SIGABRT" in died.reason and "no kernel image" in died.reason
    dumped = fg.probe_in_child(2, argv=[sys.executable, "-X", "faulthandler", "-c", (
        "import os, sys; sys.stderr.write('CUDA error 209 no kernel image\\n'); sys.stderr.flush(); os.abort()")])
    assert dumped.reason.endswith("was killed by SIGABRT: CUDA error 209 no kernel image"), dumped.reason
    failed = fg.probe_in_child(1, argv=[sys.executable, "-c", "raise SystemExit('CUDA driver too old')"])
    assert not failed.ok and "exited with status 1: CUDA driver too old" in failed.reason
    hung = fg.probe_in_child(1, argv=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert not hung.ok and "did not finish within 2 s" in hung.reason
    silent = fg.probe_in_child(1, argv=[sys.executable, "-c", "pass"])
    assert not silent.ok and "gave no result" in silent.reason
    passed = fg.probe_in_child(4, argv=[sys.executable, "-c", "import json; print('faiss says hi'); "
                                        "print(json.dumps({'ok': True, 'gpus': 4, 'reason': 'matched'}))"])
    assert passed == fg.GpuProbe(True, 4, "matched")

    # the real child, told of 1 GPU: this faiss-cpu build has no GPU cloner, so its test search
    # fails inside the child, which reports it
    monkeypatch.setattr(fg, "_PROBE", None)
    with caplog.at_level(logging.WARNING, logger="guidealign.retrieval.faiss_gpu"):
        res = fg.probe_gpus(n=1)
    assert not res.ok and res.gpus == 1
    assert res.reason.startswith("a test search on 1 GPU(s) failed: AttributeError"), res.reason
    assert "FAISS GPU probe: a test search on 1 GPU(s) failed" in caplog.text
    index, _ = _flat()
    assert fg.to_gpus(index, "flat", "auto", clone=lambda i, n: pytest.fail("cloned")) is index


def test_faiss_gpus_are_counted_in_the_probe_child_not_in_the_rank_process(monkeypatch, caplog):
    """FAISS's GPU count is a CUDA call that aborts the process on a CUDA error, like the test
    search: a build with GPU code counts in the child; one without starts no child at all."""
    import guidealign.retrieval.faiss_gpu as fg

    monkeypatch.setattr(fg, "faiss_gpu_count", lambda: pytest.fail("GPUs counted in the rank process"))
    monkeypatch.setattr(fg, "_PROBE", None)
    monkeypatch.setattr(fg, "has_gpu_code", lambda: True)  # as a faiss-gpu build
    with caplog.at_level(logging.WARNING, logger="guidealign.retrieval.faiss_gpu"):
        res = fg.probe_gpus()  # the real child counts: 0 with this faiss-cpu build
    assert res == fg.GpuProbe(False, 0, fg.NO_GPU)
    assert "FAISS GPU probe: FAISS sees no GPU" in caplog.text
    aborted = fg.probe_in_child(argv=[sys.executable, "-c", (
        "import os, sys; sys.stderr.write('Faiss assertion err__ == cudaSuccess failed: CUDA driver "
        "version is insufficient\\n'); sys.stderr.flush(); os.abort()")])
    assert not aborted.ok and aborted.gpus == 0
    assert aborted.reason.startswith("the GPU count and test search was killed by SIGABRT: "), aborted.reason
    assert aborted.reason.endswith("CUDA driver version is insufficient"), aborted.reason

    monkeypatch.undo()  # the real has_gpu_code: this faiss-cpu build has no GPU code
    monkeypatch.setattr(fg, "_PROBE", None)
    monkeypatch.setattr(fg, "faiss_gpu_count", lambda: pytest.fail("GPUs counted in the rank process"))
    monkeypatch.setattr(fg, "probe_in_child", lambda *a, **k: pytest.fail("a child started"))
    assert fg.probe_gpus() == fg.GpuProbe(False, 0, fg.NO_GPU)


def test_faiss_stays_on_the_cpu_past_the_gpu_k_limit(monkeypatch, caplog):
    """A GPU index refuses k (and an IVF nprobe) over 2048: such a search stays on the CPU."""
    import faiss

    import guidealign.retrieval.faiss_gpu as fg

    monkeypatch.setattr(fg, "_PROBE", fg.GpuProbe(True, 2, "matched"))
    index, x = _flat()
    seen = []
    clone = lambda i, n: seen.append(n) or i  # noqa: E731
    assert fg.to_gpus(index, "flat", "auto", clone=clone, k=fg.GPU_MAX_K) is index and seen == [2]
    with caplog.at_level(logging.WARNING, logger="guidealign.retrieval.faiss_gpu"):
        assert fg.to_gpus(index, "flat", "auto", clone=clone, k=fg.GPU_MAX_K + 1) is index
    assert seen == [2] and "k 2049 over the GPU index limit of 2048" in caplog.text
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.nprobe = 3000
    assert fg.to_gpus(ivf, "ivf", "auto", clone=clone, k=20) is ivf and seen == [2]
    assert "nprobe 3000 over the GPU index limit" in caplog.text
    ivf.nprobe = 16
    fg.to_gpus(ivf, "ivf", "auto", clone=clone, k=20)
    assert seen == [2, 2]


def test_search_gpus_counts_only_searches_the_gpu_index_takes(monkeypatch):
    import guidealign.retrieval.faiss_gpu as fg

    monkeypatch.setattr(fg, "_PROBE", fg.GpuProbe(True, 4, "matched"))
    assert fg.search_gpus("flat", "auto", k=20) == 4
    assert fg.search_gpus("ivf", "auto", k=20, nprobe=fg.GPU_MAX_K) == 4
    assert fg.search_gpus("flat", "auto", k=fg.GPU_MAX_K + 1) == 0
    assert fg.search_gpus("ivf", "auto", k=20, nprobe=fg.GPU_MAX_K + 1) == 0
    assert fg.search_gpus("hnsw", "auto", k=20) == 0
    assert fg.search_gpus("flat", False, k=20) == 0
    monkeypatch.setattr(fg, "_PROBE", fg.GpuProbe(False, 4, "no kernel image"))
    assert fg.search_gpus("flat", "auto", k=20) == 0


@pytest.mark.slow
def test_index_records_the_gpus_retrieve_will_search_on(monkeypatch, tmp_path):
    """The index stage's recorded GPU count follows retrieve's top_n: over FAISS GPU's k limit
    retrieve searches on the CPU, and the record says 0, not the probe's count."""
    import guidealign.retrieval.faiss_gpu as fg
    from guidealign.config import load_config
    from guidealign.retrieval.index import run_index
    from guidealign.retrieval.library import run_library
    from synthetic import coded_guideline_rows, write_guideline_shards

    monkeypatch.setattr(fg, "_PROBE", fg.GpuProbe(True, 2, "matched"))  # no clone: the index stage never searches
    recorded = {}
    for top_n in (20, fg.GPU_MAX_K + 1):
        wd = tmp_path / f"run{top_n}"
        write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
        cfg = load_config(overrides=["library.threads=1", "index.threads=1", "library.use_gpu=false",
                                     "index.model=embedded:all-minilm-l6-v2", f"retrieve.top_n={top_n}"])
        run_library(cfg, wd, progress=False)
        rep = run_index(cfg, wd, progress=False)
        recorded[top_n] = (rep.gpus, json.loads((wd / "index" / "_done.json").read_text())["gpus"])
    assert recorded == {20: (2, 2), fg.GPU_MAX_K + 1: (0, 0)}


def test_gpu_recipe_leaves_faiss_gpu_to_the_probe():
    from guidealign.config import load_config

    cfg = load_config(REPO / "configs" / "gpu-paper.yaml")
    assert cfg.library.use_gpu == "auto" and cfg.index.use_gpu == "auto"
    assert cfg.executor.wait_timeout_s == 0 and 0 < cfg.executor.stall_timeout_s <= 3600


# --- visible GPUs that torch cannot use ---------------------------------------------------

def test_visible_but_unusable_gpus_fail_loudly(tmp_path):
    from guidealign.core.gpu import GpuUnusable, require_usable_gpus

    # this machine's torch has no CUDA: GPUs "visible" through CUDA_VISIBLE_DEVICES
    with pytest.raises(GpuUnusable, match=r"GPUs are visible \(0,1\) but torch .* cannot use them"):
        require_usable_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "PATH": str(tmp_path)})
    # ... or listed by nvidia-smi
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -L ]; then echo 'GPU 0: NVIDIA H200 (UUID: GPU-1)';"
                    " else echo '535.104.05, NVIDIA H200'; fi\n")
    fake.chmod(0o755)
    with pytest.raises(GpuUnusable, match="driver: 535.104.05, NVIDIA H200"):
        require_usable_gpus({"PATH": str(tmp_path)})
    # no GPU visible, or GPUs hidden on purpose: the CPU is fine
    assert require_usable_gpus({"PATH": str(tmp_path / "none")}) == 0
    assert require_usable_gpus({"CUDA_VISIBLE_DEVICES": "", "PATH": str(tmp_path)}) == 0
    # a torch that can use them
    assert require_usable_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, cuda_available=lambda: True) == 2



def test_encoders_refuse_visible_gpus_that_torch_cannot_use(monkeypatch, embedder_path):
    """The encoder stages (library, train-retriever, index, retrieve) and the eval classifier
    pick their device themselves: with GPUs visible and a torch that cannot use them they stop
    with the reason, as the engine does, instead of encoding and training on the CPU of a GPU
    node (a stage that runs alone, or a run whose generation outputs are done, starts no engine
    to stop it). No GPU visible: the CPU, as before."""
    from guidealign.core.gpu import GpuUnusable, torch_device
    from guidealign.retrieval.embed import load_encoder

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # this machine's torch has no CUDA
    with pytest.raises(GpuUnusable, match=r"GPUs are visible \(0,1,2,3\)"):
        load_encoder(embedder_path)
    with pytest.raises(GpuUnusable):
        torch_device()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert torch_device() == "cpu"
    assert str(load_encoder(embedder_path).device) == "cpu"
    # a device named by the caller is taken as it is
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert str(load_encoder(embedder_path, device="cpu").device) == "cpu"


# --- models fetch: every Hub model of a recipe, once, into the shared cache ---------------

def _fake_cached_repo(cache: Path, repo_id: str) -> Path:
    """A model in the Hugging Face cache layout (what snapshot_download leaves behind)."""
    d = cache / f"models--{repo_id.replace('/', '--')}"
    snap = d / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("0123abcd")
    return snap


def test_models_fetch_offline_names_what_is_missing_and_accepts_the_cache(tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("engine: {model: example-org/chat-model-7b}\n"
                   "retriever: {base_model: example-org/encoder}\n"
                   f"sft: {{base_model: {tmp_path}}}\n")  # a local path: nothing to fetch
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    p = guidealign("models", "fetch", "-c", str(cfg), env=env, timeout=300)
    assert p.returncode != 0
    assert "HF_HUB_OFFLINE=1 forbids downloading them" in p.stderr
    assert "engine.model=example-org/chat-model-7b" in p.stderr
    assert "retriever.base_model=example-org/encoder" in p.stderr
    assert f"sft.base_model: {tmp_path}: local path" in p.stdout
    # the dry run only says what it would do
    p = guidealign("models", "fetch", "--dry-run", "-c", str(cfg), env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "example-org/chat-model-7b: would download (but HF_HUB_OFFLINE=1)" in p.stdout
    # once both are in the shared cache, an offline node accepts the recipe
    _fake_cached_repo(tmp_path / "hf" / "hub", "example-org/chat-model-7b")
    snap = _fake_cached_repo(tmp_path / "hf" / "hub", "example-org/encoder")
    p = guidealign("models", "fetch", "-c", str(cfg), env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"retriever.base_model: example-org/encoder: cached at {snap}" in p.stdout


def test_models_fetch_of_the_embedded_recipe_downloads_nothing():
    p = guidealign("models", "fetch", env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "engine.model: embedded:smollm2-135m-instruct: embedded" in p.stdout
    assert "download" not in p.stdout


# --- run.sh: one extra per environment; launch never installs -----------------------------

def _fake_venv(tmp_path: Path, extra: str | None) -> Path:
    """An environment whose python is this one (so nothing is ever installed into it)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    if extra:
        (venv / ".guidealign-extra").write_text(extra + "\n")
    return venv


def run_sh(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "run.sh"), *args], cwd=REPO, env={**CLEAN_ENV, **env},
                          capture_output=True, text=True, timeout=300)


def test_setup_refuses_to_install_the_other_extra(tmp_path):
    venv = _fake_venv(tmp_path, "cpu")
    p = run_sh("setup", env={"GUIDEALIGN_VENV": str(venv), "GUIDEALIGN_EXTRA": "gpu"})
    assert p.returncode == 1
    assert "holds the 'cpu' set; refusing to install the 'gpu' set over it" in p.stderr
    assert "installing" not in p.stdout
    # an older environment, known by its stamp's name, is refused the same way
    (venv / ".guidealign-extra").unlink()
    (venv / ".guidealign-gpu").write_text("0123")
    p = run_sh("setup", env={"GUIDEALIGN_VENV": str(venv)})  # GUIDEALIGN_EXTRA defaults to cpu
    assert p.returncode == 1 and "holds the 'gpu' set" in p.stderr
    p = run_sh("setup", env={"GUIDEALIGN_VENV": str(venv), "GUIDEALIGN_EXTRA": "cuda"})
    assert p.returncode == 2 and "must be cpu or gpu" in p.stderr


def test_run_sh_launch_never_installs(tmp_path):
    # an environment whose stamp would make setup reinstall: launch must not even look
    venv = _fake_venv(tmp_path, "gpu")
    p = run_sh("launch", "--dry-run", "index", "-w", str(tmp_path / "w"),
               env={"GUIDEALIGN_VENV": str(venv), "CUDA_VISIBLE_DEVICES": "0,1"})
    assert p.returncode == 0, p.stderr
    assert "== installing" not in p.stdout + p.stderr and "up to date" not in p.stdout
    assert "-m guidealign index -w" in p.stdout
    # no environment at all: a clear message, not an install
    p = run_sh("launch", "--dry-run", "index", "-w", "x",
               env={"GUIDEALIGN_VENV": str(tmp_path / "none")})
    assert p.returncode == 1 and "launch never installs" in p.stderr


@pytest.mark.parametrize("stage", ["library", "index"])
def test_faiss_gpu_probe_runs_before_the_encoder_takes_a_gpu(tmp_path, monkeypatch, stage):
    """FAISS's GPU probe is a child process that clones onto every GPU. The index stage (and the
    library with model candidates) probed after encoding, i.e. after torch in the stage's own
    process held GPU 0: on EXCLUSIVE_PROCESS GPUs (one process each) the probe then failed,
    recording no GPU search (``use_gpu: auto``) or failing the stage (``use_gpu: true``)."""
    from guidealign.config import load_config
    from guidealign.retrieval import embed, faiss_gpu
    from guidealign.retrieval.faiss_gpu import GpuProbe
    from guidealign.retrieval.index import run_index
    from guidealign.retrieval.library import run_library
    from synthetic import coded_guideline_rows, write_guideline_shards

    sets = ["library.threads=1", "index.threads=1", "retriever.threads=1", "library.use_gpu=false",
            "index.use_gpu=false"]
    wd = tmp_path / "run"
    write_guideline_shards(wd / "guidelines", coded_guideline_rows(4, 3, seed=2), shard_rows=8)
    if stage == "index":
        run_library(load_config(overrides=sets), wd, progress=False)
    calls = []
    monkeypatch.setattr(faiss_gpu, "_PROBE", None)
    monkeypatch.setattr(faiss_gpu, "probe_gpus", lambda *a, **k: calls.append("probe") or GpuProbe(False, 0, "t"))
    real = embed.load_encoder

    def encoder(*a, **k):
        calls.append("encoder")
        return real(*a, **k)

    monkeypatch.setattr(embed, "load_encoder", encoder)
    if stage == "library":
        run_library(load_config(overrides=sets + ["library.candidates=model", "library.use_gpu=auto"]), wd,
                    progress=False)
    else:
        run_index(load_config(overrides=sets + ["index.use_gpu=auto", "index.model=embedded:all-minilm-l6-v2"]),
                  wd, progress=False)
    assert "encoder" in calls and "probe" in calls
    assert calls.index("probe") < calls.index("encoder")


def test_models_fetch_leaves_out_pytorch_weights_where_safetensors_are_there(tmp_path):
    """Repos such as Llama-2-13b-hf ship the weights twice (.safetensors and .bin): fetch took
    both, 26 GB for nothing; a repo with .bin weights only (vicuna-13b-v1.5) still gets them, and
    an offline node accepts either snapshot as cached."""
    from hubserver import HubServer
    from test_push import TOKEN, hub_env

    with HubServer(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path)
        env.pop("HF_HUB_CACHE", None)
        # a sentence-transformers module keeps its own weights in a subfolder, .bin only: kept
        for repo, files in (("org/both", ("model.safetensors", "pytorch_model.bin", "2_Dense/pytorch_model.bin")),
                            ("org/binonly", ("pytorch_model.bin",))):
            src = tmp_path / repo.replace("/", "_")
            (src / "2_Dense").mkdir(parents=True)
            (src / "config.json").write_text("{}")
            for f in files:
                (src / f).write_bytes(b"w" * 2000)
            up = ("from huggingface_hub import HfApi; a = HfApi(); "
                  f"a.create_repo({repo!r}, exist_ok=True); a.upload_folder(folder_path={str(src)!r}, repo_id={repo!r})")
            assert subprocess.run([sys.executable, "-c", up], env=env, capture_output=True,
                                  text=True, timeout=300).returncode == 0
        cfg = tmp_path / "recipe.yaml"
        cfg.write_text("engine: {model: org/both}\nsft: {base_model: org/binonly}\n")
        p = subprocess.run([sys.executable, "-m", "guidealign", "models", "fetch", "-c", str(cfg)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    hub_dir = Path(env["HF_HOME"]) / "hub"
    def names(repo):
        snap = next(hub_dir.glob(f"models--org--{repo}/snapshots/*"))
        return {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} - {".gitattributes"}

    assert names("both") == {"config.json", "model.safetensors", "2_Dense/pytorch_model.bin"}
    assert names("binonly") == {"config.json", "pytorch_model.bin"}
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "guidealign", "models", "fetch", "-c", str(cfg)],
                       cwd=REPO, env=offline, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count(": cached at ") == 2, p.stdout + p.stderr[-2000:]
