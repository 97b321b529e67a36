"""The GPU path, checked without a GPU: the decisions it takes from the environment (GPU ids,
MIG devices, tensor-parallel size, bf16 support) and the engine's lifetime, with torch's CUDA
queries, vLLM and the shard machinery replaced by stand-ins. No engine starts, nothing trains."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

MIG_SMI = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
  MIG 3g.40gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
  MIG 3g.40gb     Device  1: (UUID: MIG-cba663e8-9bed-5b7e-b4ba-a4fc8b1f3c2e)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-0e1f3b8c-1a2b-4c5d-8e9f-0a1b2c3d4e5f)
"""


# --- GPU ids: MIG devices are one per process --------------------------------------------

def test_nvidia_smi_list_gives_each_mig_device_its_own_id():
    from guidealign.core.gpu import parse_nvidia_smi_list

    assert parse_nvidia_smi_list(MIG_SMI) == ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f",
                                              "MIG-cba663e8-9bed-5b7e-b4ba-a4fc8b1f3c2e", "1"]
    assert parse_nvidia_smi_list("GPU 0: H200 (UUID: GPU-1)\nGPU 1: H200 (UUID: GPU-2)\n") == ["0", "1"]


def test_visible_gpus_from_nvidia_smi_on_a_mig_node(tmp_path):
    from guidealign.core.gpu import visible_gpus

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + MIG_SMI + "EOF\n")
    fake.chmod(0o755)
    got = visible_gpus({"PATH": str(tmp_path)})
    assert got[:2] == ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f",
                       "MIG-cba663e8-9bed-5b7e-b4ba-a4fc8b1f3c2e"] and got[2] == "1"


def test_tensor_parallel_must_fit_the_process_devices():
    from guidealign.core.gpu import check_tensor_parallel, devices_per_process

    check_tensor_parallel(4, ["0", "1", "2", "3"])
    check_tensor_parallel(2, ["GPU-5d5ba0d6", "GPU-0e1f3b8c"])  # GPU UUIDs are whole GPUs
    check_tensor_parallel(1, ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"])
    assert devices_per_process(["MIG-a", "MIG-b"]) == 1
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs 4 GPUs, but this process may use 2"):
        check_tensor_parallel(4, ["0", "1"])
    with pytest.raises(ValueError, match="MIG devices and a process can use only one"):
        check_tensor_parallel(2, ["MIG-a", "MIG-b"])


def test_build_llm_refuses_tensor_parallel_beyond_its_gpus_before_starting_vllm(monkeypatch):
    import guidealign.core.gpu as gpu
    import guidealign.core.models as models
    from guidealign.gen import engine

    def no_engine(**kw):
        raise AssertionError("vLLM was started")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=no_engine))
    monkeypatch.setattr(models, "resolve", lambda name: name)
    monkeypatch.setattr(gpu, "require_usable_gpus", lambda *a, **k: 2)
    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")
    with pytest.raises(ValueError, match="MIG devices"):
        engine.build_llm(engine.EngineConfig(model="m", tensor_parallel_size=2))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="needs 4 GPUs, but this process may use 2"):
        engine.build_llm(engine.EngineConfig(model="m", tensor_parallel_size=4))


def test_build_llm_passes_max_num_batched_tokens_only_when_set(monkeypatch):
    """engine.max_num_batched_tokens reaches vLLM's LLM; unset, vLLM keeps its own default."""
    import guidealign.core.models as models
    from guidealign.gen import engine

    class Started(Exception):
        pass

    def capture(**kw):
        raise Started(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=capture))
    monkeypatch.setattr(models, "resolve", lambda name: name)
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(Started) as e:
        engine.build_llm(engine.EngineConfig(model="m", max_num_batched_tokens=1024))
    assert e.value.args[0]["max_num_batched_tokens"] == 1024
    with pytest.raises(Started) as e:
        engine.build_llm(engine.EngineConfig(model="m"))
    assert "max_num_batched_tokens" not in e.value.args[0]


def test_sft_counts_mig_node_gpus_as_one_training_process(monkeypatch):
    from guidealign.sft import launcher

    monkeypatch.setenv(launcher.NODE_GPUS_ENV, "MIG-a,MIG-b,MIG-c")
    assert launcher.visible_gpus() == 1
    from guidealign.config import load_config

    assert launcher.resolve_num_processes(load_config(None).sft) == 1  # num_processes: auto
    monkeypatch.setenv(launcher.NODE_GPUS_ENV, "GPU-x,GPU-y")
    assert launcher.visible_gpus() == 2


# --- bf16 only where the GPU has it -------------------------------------------------------

def _fake_gpu(monkeypatch, *, cc_major: int):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # torch's own answer: native bf16 from compute capability 8.0, emulated (True) below unless
    # including_emulation=False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: cc_major >= 8 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")


def test_auto_precision_is_not_emulated_bf16_on_a_v100(monkeypatch):
    from guidealign.sft.precision import precision_flags

    _fake_gpu(monkeypatch, cc_major=7)
    flags, p = precision_flags(SimpleNamespace(precision="auto"))
    assert p == "float32" and flags == {"bf16": False, "fp16": False}
    with pytest.raises(ValueError, match=r"sft.precision is bf16 but this GPU \(Tesla V100"):
        precision_flags(SimpleNamespace(precision="bf16"))
    _fake_gpu(monkeypatch, cc_major=9)
    assert precision_flags(SimpleNamespace(precision="auto"))[1] == "bf16"
    assert precision_flags(SimpleNamespace(precision="bf16"))[0] == {"bf16": True, "fp16": False}


def test_choose_precision_on_the_cpu():
    from guidealign.sft.precision import choose_precision

    assert choose_precision("auto", cuda=False, native_bf16=False) == "float32"
    assert choose_precision("bf16", cuda=False, native_bf16=False) == "bf16"  # CPU bf16: allowed
    with pytest.raises(ValueError, match="must be auto, bf16, fp16 or float32"):
        choose_precision("half", cuda=True, native_bf16=True)


# --- an engine a stage built is stopped when the stage ends -------------------------------

def _fake_stage_machinery(monkeypatch, closed: list, built: list):
    import guidealign.gen.yieldstats as yieldstats
    import guidealign.shards as shards
    from guidealign.gen import engine

    def fake_map_shards(stage, src, dst, fp, *, make_fn, **kw):
        make_fn()  # a shard needs work: the engine is built
        return SimpleNamespace(stats={})

    monkeypatch.setattr(shards, "read_manifest", lambda src: {"shards": 1})
    monkeypatch.setattr(shards, "map_shards", fake_map_shards)
    monkeypatch.setattr(yieldstats, "with_yield", lambda rep, dst: rep)
    monkeypatch.setattr(engine, "build_llm", lambda ecfg: built.append(ecfg) or f"engine{len(built)}")
    monkeypatch.setattr(engine, "close_llm", lambda llm, timeout=60.0: closed.append(llm) or 0)
    return engine


def test_engine_built_by_a_stage_is_closed_after_it(monkeypatch, tmp_path):
    closed, built = [], []
    engine = _fake_stage_machinery(monkeypatch, closed, built)
    cfg = SimpleNamespace(engine=SimpleNamespace(model="respond-engine"))
    engine.run_engine_stage("respond", cfg, tmp_path / "a", tmp_path / "b", "fp",
                            lambda c, llm: (lambda rows: rows))
    assert built == [cfg.engine] and closed == ["engine1"]
    # an engine the caller passed in is the caller's to stop (detect -> guidelines share one)
    engine.run_engine_stage("detect", cfg, tmp_path / "a", tmp_path / "b", "fp",
                            lambda c, llm: (lambda rows: rows), llm="shared")
    assert closed == ["engine1"]


def test_engine_built_by_a_failing_stage_is_closed_too(monkeypatch, tmp_path):
    import guidealign.shards as shards

    closed, built = [], []
    engine = _fake_stage_machinery(monkeypatch, closed, built)

    def failing(stage, src, dst, fp, *, make_fn, **kw):
        make_fn()
        raise RuntimeError("engine fault")

    monkeypatch.setattr(shards, "map_shards", failing)
    with pytest.raises(RuntimeError, match="engine fault"):
        engine.run_engine_stage("respond", SimpleNamespace(engine=SimpleNamespace(model="e")), tmp_path / "a",
                                tmp_path / "b", "fp", lambda c, llm: (lambda rows: rows))
    assert closed == ["engine1"]


def test_sft_waits_for_the_node_gpus_an_engine_still_holds():
    from guidealign.core.gpu import parse_memory_query, wait_gpus_free

    smi = ("0, GPU-aaa, 127000, 143771\n1, GPU-bbb, 3, 143771\n2, GPU-ccc, [N/A], [N/A]\n")
    mem = parse_memory_query(smi)
    assert mem["0"] == mem["GPU-aaa"] == (127000.0, 143771.0) and "2" not in mem
    # GPU 0's engine stops after two polls; GPU 2 (not reported: MIG) is not waited for
    reports = [smi, smi, smi.replace("127000", "5")]
    slept = []
    busy = wait_gpus_free(["0", "1", "2"], memory=lambda: parse_memory_query(reports.pop(0)),
                          sleep=slept.append, clock=lambda: 0.0)
    assert busy == [] and len(slept) == 2
    # a GPU that stays busy: the wait ends at the timeout and names it
    t = iter(range(0, 1000, 5))
    assert wait_gpus_free(["GPU-aaa", "1"], memory=lambda: mem, sleep=lambda s: None,
                          clock=lambda: float(next(t)), timeout_s=20) == ["GPU-aaa"]


def test_cached_gpu_memory_is_released_before_an_engine_or_sft_starts(monkeypatch):
    """retrieve's embedder (or eval's classifier) left torch's cached GPU memory in the process
    that then started vLLM, which refuses to start when free memory is below
    gpu_memory_utilization x total (found in review). release_cached_gpu_memory empties the
    cache once CUDA is in use; build_llm calls it on GPUs (stand-in torch: no GPU here)."""
    import sys
    import types

    from guidealign.core.gpu import release_cached_gpu_memory

    emptied = []
    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 empty_cache=lambda: emptied.append(1))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    release_cached_gpu_memory()
    assert emptied == [1]
    cuda.is_initialized = lambda: False  # CUDA never used in this process: nothing to release
    release_cached_gpu_memory()
    assert emptied == [1]
    import inspect

    from guidealign.gen import engine
    from guidealign.sft import train
    assert "release_cached_gpu_memory()" in inspect.getsource(engine.build_llm)
    assert "release_cached_gpu_memory()" in inspect.getsource(train._wait_for_the_node_gpus)


def test_the_gpu_smoke_script_fails_when_its_steps_fail_and_on_bad_arguments(tmp_path):
    """It exited 0 whatever failed (its last command was `cat summary.txt`), took a missing
    MODELS path as empty, and ran `check` from an unquoted heredoc: the evidence of a 15-minute
    GPU loan read as a success."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.sh"
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    bad = subprocess.run(["bash", str(script), str(tmp_path / "none"), str(tmp_path / "r"), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
    env = {**os.environ, "PYTHON": "false", "STEP_TIMEOUT": "20", "PATH": os.environ["PATH"]}
    p = subprocess.run(["bash", str(script), str(tmp_path / "m"), str(tmp_path / "r"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "failed:" in p.stderr and "check-paper" not in p.stderr.split("failed:")[1]
    assert "command not found" not in (p.stdout + p.stderr).replace("nvidia-smi: command not found", "")
