"""Stop 55 review of yield and the detect modes' bench: detect's rows in left out the duplicate
questions it set aside (respond counts its own), a rank's summary printed the whole dataset's
yield of the moment as if final, and calibrating a threshold "with the same --config" ran the
bench's own model and dtype instead of the config's."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.core.models import prepare_generator
from guidealign.gen.detect import run_detect
from guidealign.gen.yieldstats import KEYS, shard_counts
from guidealign.shards import fingerprint, read_marker, write_manifest, write_shard
from standins import FakeLLM, small_gen_cfg
from synthetic import write_prompt_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return str(prepare_generator())


@pytest.fixture(scope="module")
def llm(gen):
    from transformers import AutoTokenizer

    return FakeLLM(AutoTokenizer.from_pretrained(gen), lambda p: ("About baking.\nVerdict: No", "stop"))


def test_detects_rows_in_counts_the_duplicate_questions_it_sets_aside(tmp_path, gen, llm):
    src = tmp_path / "augment"
    write_manifest(src, stage="augment", num_shards=2, fingerprint="aug")
    for i, ids in enumerate([["a", "b"], ["b", "c"]]):  # "b" kept by two risk types
        write_shard(src, i, pa.table({"id": ids, "prompt": [f"question {x}?" for x in ids]}), fingerprint("aug", i))
    rep = run_detect(small_gen_cfg(gen, "detect.input=augment"), tmp_path, llm=llm, progress=False)
    assert rep.stats["yield"]["yield_rows_in"] == 4 and "4 rows in" in rep.summary()
    m = read_marker(tmp_path / "detect", 1)
    assert (m.rows, m.quarantined, m.stats["yield_rows_in"]) == (1, 1, 2)
    # the count a marker without yield stats gets from the shard's columns is the same
    bare = type(m)(**{**m.__dict__, "stats": {k: v for k, v in m.stats.items() if k not in KEYS}})
    assert shard_counts(tmp_path / "detect", 1, marker=bare)["yield_rows_in"] == 2


def test_a_ranks_summary_says_its_yield_is_the_dataset_so_far_while_shards_are_left(tmp_path, gen, llm):
    write_prompt_shards(tmp_path / "prompts", [{"id": f"p{i}", "prompt": f"Question {i}: how do I bake bread?"}
                                               for i in range(12)], 3)
    cfg = small_gen_cfg(gen)
    first = run_detect(cfg, tmp_path, rank=0, world_size=2, llm=llm, progress=False).summary()
    assert "yield of the dataset so far (2 of 4 shards committed): 6 rows in" in first, first
    last = run_detect(cfg, tmp_path, rank=1, world_size=2, llm=llm, progress=False).summary()
    assert "\n  yield: 12 rows in" in last, last  # every shard committed: the dataset's figure


def _bench():
    spec = importlib.util.spec_from_file_location("detect_modes_s55", ROOT / "bench" / "detect_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**given):
    flags = dict(config=None, model=None, dtype=None, max_model_len=None, max_num_seqs=None, kv_gib=None,
                 temperature=None, max_tokens=None, max_exemplars=None, block_size=None, no_align=False, set=[])
    return argparse.Namespace(**{**flags, **given})


def test_the_threshold_bench_runs_the_configs_engine_and_detect_settings_unless_flags_say_otherwise():
    from guidealign.config import load_config

    dm = _bench()
    demo = load_config(str(ROOT / "configs" / "demo.yaml"))
    cfg = dm.make_cfg(dm.with_bench_defaults(_args(config=str(ROOT / "configs" / "demo.yaml"))), "rationale")
    assert (cfg.engine.model, cfg.engine.dtype, cfg.engine.max_model_len) == \
        (demo.engine.model, demo.engine.dtype, demo.engine.max_model_len)
    assert cfg.detect.sampling == demo.detect.sampling and cfg.detect.mode == "rationale"
    assert demo.engine.dtype == "float32"  # the demo's: the bench's own default is bfloat16
    # a flag given still wins over the config
    cfg = dm.make_cfg(dm.with_bench_defaults(_args(config=str(ROOT / "configs" / "demo.yaml"), dtype="bfloat16",
                                                   max_tokens=99)), "score")
    assert (cfg.engine.dtype, cfg.detect.sampling.max_tokens, cfg.detect.mode) == ("bfloat16", 99, "score")
    # without --config, the bench's own defaults (the figures' commands are unchanged)
    cfg = dm.make_cfg(dm.with_bench_defaults(_args()), "rationale")
    assert (cfg.engine.dtype, cfg.engine.max_model_len, cfg.detect.sampling.max_tokens,
            cfg.detect.sampling.temperature, cfg.engine.cpu_kvcache_gib) == ("bfloat16", 8192, 160, 0.0, 2)
