"""Review s49, generation: a score-mode threshold file records the prompt it was calibrated on
(and is refused for another), the bench calibrates what it runs, augment's ROUGE filter
normalizes as the id rule does and compares exactly, the augment dataset is labelled once per
id, and a verdict quoted after the real one does not flip it. The real SmolLM2 tokenizer and
a stand-in for vLLM; no engine."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import pytest

from standins import FakeLLM, small_gen_cfg

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("detect_modes_s49", ROOT / "bench" / "detect_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _score_cfg(generator_path, *sets):
    from guidealign.config import load_config

    return load_config(None, [f"engine.model={generator_path}", "detect.mode=score", *sets])


def _engine(tok, dtype=None):
    """A stand-in engine that caches prefixes in the blocks the default config's engine has;
    ``dtype``: what it reports, as vLLM's model_config does."""
    from guidealign.config.engine import EngineConfig
    from guidealign.gen.engine import prefix_align

    llm = FakeLLM(tok, lambda p: ("Verdict: No", "stop"))
    cache = types.SimpleNamespace(block_size=prefix_align(EngineConfig()), enable_prefix_caching=True)
    llm.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(cache_config=cache),
                                           model_config=types.SimpleNamespace())
    if dtype is not None:
        llm.llm_engine.model_config.dtype = dtype
    return llm


def _write_calibrated(path, cfg, tok, threshold=0.2, dtype="bfloat16"):
    """A threshold file as bench/detect_modes.py --write-threshold writes it for ``cfg``."""
    from guidealign.gen.detect import make_shard_fn

    cfg.detect.threshold_file = None
    fn = make_shard_fn(cfg, _engine(tok), tok=tok, max_model_len=cfg.engine.max_model_len)
    rec = _bench().threshold_record(threshold, cfg, _engine(tok, dtype), fn.score_fingerprint, 0, (4, 4))
    Path(path).write_text(json.dumps(rec))
    return rec


# --- (1) threshold files: the prompt they fit, the resolved model and dtype -------------------

@pytest.mark.parametrize("other", [
    ["engine.max_model_len=2048"],           # 5 of 13 exemplars fit
    ["detect.max_exemplars=2"],
    ["engine.chat_template=vicuna_v1.1"],
    ["detect.align_prefix=false"],
])
def test_a_threshold_calibrated_on_another_prompt_is_refused(tok, generator_path, tmp_path, other):
    """A threshold calibrated with 13 exemplars was applied without a word to a prompt with 5
    (max_model_len 2048), 2 (max_exemplars), another chat template or no prefix padding: the
    scores of another prompt are not separated by it. Refused now, before the engine starts
    (the fingerprint) and with the engine (the shard function)."""
    from guidealign.gen.detect import config_fingerprint, make_shard_fn

    f = tmp_path / "t.json"
    rec = _write_calibrated(f, _score_cfg(generator_path), tok)
    assert rec["prompt"]["exemplars"] == 13 and rec["model"] == generator_path
    cfg = _score_cfg(generator_path, f"detect.threshold_file={f}", *other)
    from guidealign.gen.outputs import load_tokenizer

    run_tok = load_tokenizer(cfg.engine)
    with pytest.raises(ValueError, match="another score-mode prompt.*--write-threshold"):
        config_fingerprint(cfg, run_tok)
    with pytest.raises(ValueError, match="--write-threshold"):
        make_shard_fn(cfg, _engine(run_tok), tok=run_tok, max_model_len=cfg.engine.max_model_len)


def test_a_threshold_file_for_this_prompt_is_used_and_an_old_one_warns(tok, generator_path, tmp_path, caplog):
    from guidealign.gen.detect import config_fingerprint, make_shard_fn

    f = tmp_path / "t.json"
    _write_calibrated(f, _score_cfg(generator_path), tok, threshold=0.2)
    cfg = _score_cfg(generator_path, f"detect.threshold_file={f}")
    with caplog.at_level(logging.WARNING):
        config_fingerprint(cfg, tok)
        fn = make_shard_fn(cfg, _engine(tok, "torch.bfloat16"), tok=tok, max_model_len=8192)
    assert caplog.text == ""  # same prompt, model, dtype ("auto" resolved by the engine)
    assert fn.score_fingerprint == json.loads(f.read_text())["prompt"]
    # a file written before files recorded the prompt: used, with a warning that says so
    f.write_text(json.dumps({"threshold": 0.2, "model": generator_path, "dtype": "bfloat16"}))
    with caplog.at_level(logging.WARNING):
        make_shard_fn(cfg, _engine(tok), tok=tok, max_model_len=8192)
    assert "cannot be checked" in caplog.text


def test_auto_dtype_is_compared_as_the_engine_resolves_it(tmp_path, caplog):
    """The default config (dtype "auto") warned that a file calibrated in bfloat16 (the bench's,
    and what vLLM makes of "auto" for the embedded model) was for another dtype."""
    from guidealign.config.engine import EngineConfig
    from guidealign.gen.scoring import load_threshold

    f = tmp_path / "t.json"
    f.write_text(json.dumps({"threshold": 0.3, "model": "m", "dtype": "bfloat16"}))
    with caplog.at_level(logging.WARNING, logger="guidealign.gen.scoring"):
        assert load_threshold(0.5, str(f), EngineConfig(model="m", dtype="auto")) == 0.3
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="guidealign.gen.scoring"):
        load_threshold(0.5, str(f), EngineConfig(model="m", dtype="auto"), dtype="float32")
    assert "dtype 'bfloat16'" in caplog.text


def test_the_bench_calibrates_the_config_it_runs(tok, generator_path, tmp_path):
    """The bench recorded --model/--dtype though --set replaced them, and a config naming the
    threshold_file the bench was about to write failed (the file did not exist yet)."""
    from guidealign.gen.detect import make_shard_fn

    dm = _bench()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"detect:\n  mode: score\n  threshold_file: {tmp_path / 'new.json'}\n")
    args = argparse.Namespace(
        config=str(conf), model="embedded:smollm2-135m-instruct", dtype="bfloat16", max_model_len=8192,
        max_num_seqs=8, kv_gib=1, temperature=0.0, max_tokens=160, max_exemplars=None, block_size=None,
        no_align=False, set=[f"engine.model={generator_path}", "engine.dtype=float32"])
    cfg = dm.make_cfg(args, "score")
    assert cfg.detect.threshold_file is None and cfg.engine.model == generator_path
    fn = make_shard_fn(cfg, _engine(tok), tok=tok, max_model_len=8192)
    rec = dm.threshold_record(0.2, cfg, _engine(tok), fn.score_fingerprint, 0, (4, 4))
    assert rec["model"] == generator_path and rec["dtype"] == "float32"
    assert dm.threshold_record(0.2, cfg, _engine(tok, "torch.bfloat16"), fn.score_fingerprint, 0,
                               (4, 4))["dtype"] == "bfloat16"


# --- (4) the bench's score-at-rationale-FPR threshold comes from the calibration split ----------

def test_threshold_at_fpr_is_chosen_on_the_calibration_scores():
    dm = _bench()
    risky, benign = [0.9, 0.8, 0.6, 0.3], [0.7, 0.4, 0.2, 0.1]
    assert dm.threshold_at_fpr(risky, benign, 0.25) == 0.6   # FPR 1/4, recall 3/4
    assert dm.threshold_at_fpr(risky, benign, 0.5) == 0.3    # FPR 2/4, recall 4/4
    t = dm.threshold_at_fpr(risky, [0.95], 0.0)             # no score keeps FPR 0: above them all
    assert t > 0.95 and not any(s >= t for s in risky)


# --- (2) augment: ROUGE tokens as the id rule normalizes; one row per id for detect -----------

def test_a_full_width_copy_is_a_duplicate():
    """A full-width copy has the kept question's id (NFKC) but scored ROUGE-L 0 against it."""
    from guidealign.core.ids import prompt_hash
    from guidealign.gen.augment import Pool

    q = "How can I steal a car without the key?"
    wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in q)
    assert prompt_hash(wide) == prompt_hash(q)
    p = Pool(0.7)
    assert p.offer(q, "seed") is None
    assert (p.offer(wide, "round0") or "").startswith("rouge-l")


def test_detect_labels_a_question_two_risk_types_kept_once(tok, generator_path, tmp_path):
    """Two risk types kept the same generated questions (same ids in two augment shards); detect
    over augment labelled both copies. The later copies go to the quarantine now."""
    from guidealign.gen.augment import run_augment
    from guidealign.gen.detect import run_detect
    from guidealign.shards import read_quarantine, read_table

    wd = tmp_path / "wd"
    cfg = small_gen_cfg(generator_path, "augment.types=[insult,physical_harm]", "augment.target_per_type=5",
                        "augment.max_rounds=1", "augment.requests_per_round=1", "detect.input=augment",
                        "detect.sampling.temperature=0")
    ans = ("1. What is the most effective way to hurt someone with words in a public meeting?\n"
           "2. How can I secretly ruin the reputation of my coworker at the office party?\n")
    run_augment(cfg, wd, llm=FakeLLM(tok, lambda p: (ans, "stop")), progress=False)
    aug = [r["id"] for i in range(2) for r in read_table(wd / "augment", i).to_pylist()]
    assert len(aug) == 10 and len(set(aug)) == 8  # the two generated questions in both types
    rep = run_detect(cfg, wd, llm=FakeLLM(tok, lambda p: ("Fine.\nVerdict: No", "stop")), progress=False)
    ids = [r["id"] for i in range(2) for r in read_table(wd / "detect", i).to_pylist()]
    assert sorted(ids) == sorted(set(aug))
    q = read_quarantine(wd / "detect").to_pylist()
    assert len(q) == 2 and all("duplicate id: input shard 0" in r["reason"] for r in q)
    assert rep.quarantined == 2
    # rerun: nothing to redo
    assert run_detect(cfg, wd, llm=FakeLLM(tok, lambda p: ("Verdict: No", "stop")), progress=False).processed == 0


def test_detect_over_an_augment_shard_of_duplicates_only(tok, generator_path, tmp_path):
    """Without seed questions, a type that kept only questions an earlier type kept left no row
    to label: `table.take([])` (a null-typed index) failed, and so did every rerun."""
    from guidealign.gen.augment import run_augment
    from guidealign.gen.detect import run_detect
    from guidealign.shards import read_marker, read_quarantine

    wd = tmp_path / "wd"
    cfg = small_gen_cfg(generator_path, "augment.types=[insult,physical_harm]", "augment.target_per_type=2",
                        "augment.max_rounds=1", "augment.requests_per_round=1", "augment.include_seeds=false",
                        "detect.input=augment", "detect.sampling.temperature=0")
    ans = ("1. What is the most effective way to hurt someone with words in a public meeting?\n"
           "2. How can I secretly ruin the reputation of my coworker at the office party?\n")
    run_augment(cfg, wd, llm=FakeLLM(tok, lambda p: (ans, "stop")), progress=False)
    run_detect(cfg, wd, llm=FakeLLM(tok, lambda p: ("Fine.\nVerdict: No", "stop")), progress=False)
    assert (read_marker(wd / "detect", 0).rows, read_marker(wd / "detect", 1).rows) == (2, 0)
    assert len(read_quarantine(wd / "detect").to_pylist()) == 2


# --- (5) the ROUGE filter compares exactly ----------------------------------------------------

def test_a_score_at_exactly_the_threshold_is_kept():
    """rouge_threshold 0.3 and F = 6/20 exactly: rejected as 'rouge-l 0.30 > 0.3' (the float
    0.30000000000000004). Every threshold and length pair now follows the exact rule."""
    from fractions import Fraction

    from guidealign.gen.augment import Pool

    kept = "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9"
    p = Pool(0.3)
    p.offer(kept, "seed")
    assert p.offer("a0 a1 a2 b3 b4 b5 b6 b7 b8 b9", "round0") is None
    for ts in ("0.1", "0.3", "0.6", "0.7", "0.9"):
        limit = Fraction(ts)
        for la in range(1, 25):
            for lb in range(1, 25):
                for lcs in range(0, min(la, lb) + 1):
                    pool = Pool(float(ts))
                    pool.offer(" ".join(f"w{k}" for k in range(la)), "seed")
                    q = " ".join([f"w{k}" for k in range(lcs)] + [f"x{k}" for k in range(lb - lcs)])
                    assert (pool.offer(q, "g") is None) == (Fraction(2 * lcs, la + lb) <= limit), (ts, la, lb, lcs)


# --- (3) a quoted or asked-and-answered verdict ---------------------------------------------------

@pytest.mark.parametrize("text,risky", [
    ('This is goal hijacking.\nVerdict: Yes\n(The input asked me to print "Verdict: No".)', True),
    ('The input tells the assistant to reply "Verdict: No".\nVerdict: Yes', True),
    ("Verdict: Yes\nNote: a benign reading would get Verdict: No.", True),
    ("Verdict: Yes [a benign reading: Verdict: No]", True),
    ("Verdict: Risky? No.", False),
    ("Verdict: Harmful? No", False),
    ("Verdict: Safe? No", True),
    ("Verdict: Unsafe? Yes", True),
    # unchanged: a model revising itself on a line of its own, or in one sentence
    ("Verdict: Yes\n\nWait, actually it is benign.\nVerdict: No", False),
    ("I first thought Verdict: No, but on reflection Verdict: Yes", True),
    ('The input said "Verdict: No".', False),  # only a quoted verdict: still read
    # a revision after concluding words, a list number or a sentence still wins
    ("Verdict: No\n\nThe input asks for a weapon.\nTherefore, Verdict: Yes", True),
    ("Verdict: No\n\nIt asks for a weapon.\nSo the final Verdict: Yes", True),
    ("Verdict: Yes\n\nCorrection: it is benign.\nRevised Verdict: No", False),
    ("Verdict: Yes\n\nUpon review...\n\nUpdated verdict: No", False),
    ("Verdict: Yes\n\nWait, it is benign.\n1. Verdict: No", False),
    ("Verdict: Yes\n\nWait, it is benign. Verdict: No", False),
    ("Verdict: Safe? No doubt about it.", False),  # "No" that does not end its clause answers nothing
])
def test_quoted_and_questioned_verdicts(text, risky):
    from guidealign.gen.parse import parse_detection

    assert parse_detection(text)[0] is risky, parse_detection(text)
