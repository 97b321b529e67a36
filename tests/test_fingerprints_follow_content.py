"""Fingerprints follow what a stage's output depends on: content, not paths.

A review of every stage's fingerprint against the code that reads its inputs found: a saved
`datasets` dataset rewritten in place was taken as already ingested (stale prompts); an LLM
judge sampled with ``engine.seed`` while its fingerprint held the judge engine's seed; and
prompt files, the responder's exemplars file and SFT's data and template were fingerprinted by
the path as written as well as by what they hold, so the same files elsewhere (a run directory
moved, a copied prompt file) redid the stage.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from guidealign.config import load_config


# --- ingest: a saved dataset rewritten in place ---------------------------------------------

def test_a_dataset_saved_again_in_place_is_ingested_again(tmp_path):
    datasets = pytest.importorskip("datasets")
    from guidealign.ingest.run import IngestConfig, ingest
    from guidealign.shards import iter_tables

    d, work = tmp_path / "hf", tmp_path / "w"
    datasets.Dataset.from_dict({"prompt": ["alpha one", "beta two"]}).save_to_disk(str(d))
    assert ingest([str(d)], work, IngestConfig(), progress=False).written == 1
    assert ingest([str(d)], work, IngestConfig(), progress=False).written == 0  # nothing changed
    st = d.stat()
    datasets.Dataset.from_dict({"prompt": ["gamma three", "delta four"]}).save_to_disk(str(d))
    # as save_to_disk does when it overwrites the same file names: the directory's own mtime
    # stays (set back here, so the case holds whatever this datasets version does)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    rep = ingest([str(d)], work, IngestConfig(), progress=False)
    assert (rep.written, rep.skipped) == (1, 0)
    prompts = sorted(r["prompt"] for t in iter_tables(work / "prompts") for r in t.to_pylist())
    assert prompts == ["delta four", "gamma three"]


def test_a_plain_input_file_keeps_the_fingerprint_it_had(tmp_path):
    """Only directories gained the stat of their files: a file's fingerprint is still only its
    resolved path, size and mtime (with the config; v8 added ingest.instruction_inputs; Stop 50
    added strict-JSON metadata for every input but CSV/TSV, whose values are text; Stop 51 the
    quarantine of prompts without text, for every input)."""
    from guidealign.ingest.run import IngestConfig
    from guidealign.ingest.fingerprint import files_fingerprint as _fingerprint
    from guidealign.shards import fingerprint

    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "x"}\n')
    c = IngestConfig()

    def v8(p, *more):  # the rule of a plain file: its stat, with the config
        st = p.stat()
        return fingerprint("ingest-v8", c.prompt_field, list(c.prompt_aliases), c.max_chars, c.shard_rows,
                           c.encoding, c.delimiter, list(c.instruction_inputs),
                           [(str(p.resolve()), st.st_size, st.st_mtime_ns)], *more)

    assert _fingerprint([f.resolve()], c) == v8(f, "metadata-strict-json-v1", "prompt-has-text-v1", "line-pairing-v1",
                                           "sniff-whole-file-v1", "chat-turns-v1")
    # a JSON (array/object) file is read by Stop 48's rules (records after leading nulls): once more
    j = tmp_path / "in.json"
    j.write_text('[{"prompt": "x"}]')
    assert _fingerprint([j.resolve()], c) != v8(j)
    # and by Stop 54's (a bad item ends at the next item that reads, ...): once more again
    assert _fingerprint([j.resolve()], c) == v8(j, "json-array-v2", "metadata-strict-json-v1", "prompt-has-text-v1",
                                                "line-pairing-v1", "json-array-v3", "sniff-whole-file-v1",
                                                "chat-turns-v1", "json-chat-object-v1")
    # so is a CSV file (Stop 49: a record over several lines is numbered by its first line)
    v = tmp_path / "in.csv"
    v.write_text('prompt\n"x"\n')
    assert _fingerprint([v.resolve()], c) == v8(v, "csv-first-line", "prompt-has-text-v1", "line-pairing-v1", "csv-v3",
                                           "sniff-whole-file-v1", "csv-header-v1")  # no strict-JSON term


# --- the LLM judge's seed -------------------------------------------------------------------

def _seeds_used(cfg, monkeypatch) -> dict:
    """The seed each LLM judge of ``cfg``'s plans passes to the engine."""
    import guidealign.eval.judges as judges
    from guidealign.eval.judging import judge_plans

    used = {}

    def fake(kind):
        def judge(llm, items, ecfg, seed=None):
            used[kind] = seed
            return {}
        return judge

    monkeypatch.setattr(judges, "judge_pairwise", fake("pairwise"))
    monkeypatch.setattr(judges, "judge_harm_llm", fake("harm"))
    bench = {"q1": {"category": "c", "prompt": "p"}}
    answer = {"response": "a", "finish_reason": "stop"}
    resp = {"guided": {"q1": answer}, "unguided": {"q1": answer}}
    plans = judge_plans(cfg, ["harmfulness", "pairwise"], bench, resp, SimpleNamespace(judge=lambda: None))
    for kind, p in plans.items():
        p.judge(p.chunks[0])
    return used


def test_an_llm_judge_samples_with_the_seed_its_fingerprint_holds(monkeypatch):
    from guidealign.eval.judging import judge_fp

    sampled = ["eval.harm_judge=llm", "eval.judge_sampling.temperature=0.7"]
    base = load_config(None, sampled)
    own_seed = load_config(None, sampled + ["eval.judge_engine.seed=5"])
    other_engine_seed = load_config(None, sampled + ["eval.judge_engine.seed=5", "engine.seed=9"])
    assert _seeds_used(own_seed, monkeypatch) == {"harm": 5, "pairwise": 5}
    # engine.seed is not the judge's seed when eval.judge_engine sets one: same judgments
    assert _seeds_used(other_engine_seed, monkeypatch) == {"harm": 5, "pairwise": 5}
    for kind in ("harm", "pairwise"):
        assert judge_fp(own_seed, kind) != judge_fp(base, kind)
        assert judge_fp(other_engine_seed, kind) == judge_fp(own_seed, kind)


# --- the same files somewhere else ----------------------------------------------------------

def _copies(tmp_path, name: str, text: str):
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    for p in (a, b):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return a, b


def _builtin(name: str) -> str:
    from guidealign.gen.build import builtin_prompt_path

    return builtin_prompt_path(name).read_text()


def _tok():
    # (a word is one token: score mode checks the tokenizer has one-token Yes/No)
    return SimpleNamespace(chat_template="{{ messages[0]['content'] }}",
                           encode=lambda text, add_special_tokens=False: [sum(map(ord, text))])


@pytest.mark.parametrize("stage,key,builtin", [
    ("detect", "detect.prompt_file", "detect.yaml"),
    ("guidelines", "guidelines.safety_prompt_file", "safety_guidelines.yaml"),
    ("guidelines", "guidelines.quality_prompt_file", "quality_guidelines.yaml"),
    ("augment", "augment.prompt_file", "augment.yaml"),
])
def test_a_prompt_file_counts_by_what_it_holds_not_where_it_is(tmp_path, stage, key, builtin):
    import importlib

    fp = importlib.import_module(f"guidealign.gen.{stage}").config_fingerprint
    a, b = _copies(tmp_path, builtin, _builtin(builtin))
    at_a = fp(load_config(None, [f"{key}={a}"]), _tok())
    assert fp(load_config(None, [f"{key}={b}"]), _tok()) == at_a
    # the built-in file's very bytes: the same prompts as no file at all
    assert fp(load_config(None, []), _tok()) == at_a
    c = tmp_path / "c" / builtin
    c.parent.mkdir()
    c.write_text(_builtin(builtin) + "\n# edited\n")
    assert fp(load_config(None, [f"{key}={c}"]), _tok()) != at_a


def test_the_responders_exemplars_count_by_what_they_hold_not_where_they_are(tmp_path):
    from guidealign.gen.respond import respond_fingerprint

    ex = "- prompt: What is 2 + 2?\n  answer: Four.\n- prompt: Name a primary colour.\n  answer: Red.\n"
    a, b = _copies(tmp_path, "ex.yaml", "exemplars:\n" + ex)
    llm = SimpleNamespace(get_tokenizer=_tok)

    def fp(path, n):
        cfg = load_config(None, [f"respond.exemplars_file={path}", f"respond.num_exemplars={n}"])
        return respond_fingerprint(cfg, True, llm)

    assert fp(a, 2) == fp(b, 2)
    assert fp(a, 0) == fp(b, 0) == respond_fingerprint(load_config(None, []), True, llm)  # not read
    c = tmp_path / "c" / "ex.yaml"
    c.parent.mkdir()
    c.write_text("exemplars:\n" + ex.replace("Four", "Four, of course"))  # other content (files are read once a path)
    assert fp(c, 2) != fp(a, 2)


def test_the_sft_model_counts_its_data_and_template_by_content_not_path(tmp_path):
    from guidealign.sft.fingerprint import sft_fingerprint

    rep = SimpleNamespace(sources={"respond": {"shards": 1, "sha256": ["s1"]}})
    ta, tb = _copies(tmp_path, "t.jinja", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    runs = []
    for run, tpl in (("/runs/one", ta), ("/runs/two", tb)):
        cfg = load_config(None, [f"sft.data=[{run}/respond]", f"sft.chat_template={tpl}"])
        runs.append(sft_fingerprint(cfg, rep))
    assert runs[0] == runs[1]
    tc = tmp_path / "c.jinja"
    tc.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert sft_fingerprint(load_config(None, [f"sft.data=[/runs/one/respond]", f"sft.chat_template={tc}"]),
                           rep) != runs[0]
    # a built-in template's name adds its special tokens and eos, a file with its very text does not
    from guidealign.gen.templates import builtin_path

    copy = tmp_path / "chatml.jinja"
    copy.write_text(builtin_path("chatml").read_text())
    assert sft_fingerprint(load_config(None, ["sft.chat_template=chatml"]), rep) != \
        sft_fingerprint(load_config(None, [f"sft.chat_template={copy}"]), rep)
    # the datasets' order is the examples' order: it counts
    two = SimpleNamespace(sources={"a": {"shards": 1, "sha256": ["s1"]}, "b": {"shards": 1, "sha256": ["s2"]}})
    swapped = SimpleNamespace(sources=dict(reversed(list(two.sources.items()))))
    base = load_config(None, [])
    assert sft_fingerprint(base, two) != sft_fingerprint(base, swapped)
    # and so does what the shards hold
    changed = SimpleNamespace(sources={"respond": {"shards": 1, "sha256": ["s9"]}})
    assert sft_fingerprint(base, changed) != sft_fingerprint(base, rep)


def test_a_builtin_template_name_and_a_copy_of_its_text_generate_apart(tmp_path):
    """The name "chatml" also makes generation stop at its turn end (use_template); a file
    with the same text does not: the two cannot share shards (or judgments)."""
    from guidealign.eval.judging import judge_fp
    from guidealign.gen.detect import config_fingerprint
    from guidealign.gen.respond import respond_fingerprint
    from guidealign.gen.templates import builtin_path

    copy = tmp_path / "chatml.jinja"
    copy.write_text(builtin_path("chatml").read_text())
    llm = SimpleNamespace(get_tokenizer=_tok)
    name, text = load_config(None, ["engine.chat_template=chatml"]), load_config(None, [f"engine.chat_template={copy}"])
    assert config_fingerprint(name, _tok()) != config_fingerprint(text, _tok())
    assert respond_fingerprint(name, True, llm) != respond_fingerprint(text, True, llm)
    jn = load_config(None, ["eval.harm_judge=llm", "eval.judge_chat_template=chatml"])
    jt = load_config(None, ["eval.harm_judge=llm", f"eval.judge_chat_template={copy}"])
    assert judge_fp(jn, "pairwise") != judge_fp(jt, "pairwise")


# --- the engine seed where nothing is sampled -----------------------------------------------

def _stage_fps(overrides: list[str]) -> dict:
    from guidealign.eval.judging import judge_fp
    from guidealign.gen import detect, guidelines
    from guidealign.gen.respond import respond_fingerprint

    cfg = load_config(None, ["eval.harm_judge=llm"] + overrides)
    return {"detect": detect.config_fingerprint(cfg, _tok()),
            "guidelines": guidelines.config_fingerprint(cfg, _tok()),
            "respond": respond_fingerprint(cfg, True, SimpleNamespace(get_tokenizer=_tok)),
            "judge": judge_fp(cfg, "pairwise")}


@pytest.mark.parametrize("mode", ["greedy", "sampled", "score"])
def test_the_engine_seed_counts_only_where_outputs_are_sampled(mode):
    """At temperature 0 (and in detect's scoring pass) no seed changes an output: a changed
    ``engine.seed`` redoes nothing there, and redoes every sampled stage."""
    t = "0.7" if mode == "sampled" else "0"
    keys = ["detect.sampling.temperature", "guidelines.sampling.temperature",
            "respond.sampling.temperature", "eval.judge_sampling.temperature"]
    base = [f"{k}={t}" for k in keys]
    if mode == "score":  # its sampling settings are there, but the scoring pass samples nothing
        base += ["detect.mode=score", "detect.score_threshold=0.5", "detect.sampling.temperature=0.7"]
    at_default, other = _stage_fps(base), _stage_fps(base + ["engine.seed=7"])
    if mode == "sampled":
        assert all(at_default[s] != other[s] for s in at_default), (at_default, other)
    elif mode == "greedy":
        assert at_default == other
    else:  # the scoring pass reads no seed; the other stages here are greedy
        assert at_default == other


def test_a_greedy_run_at_the_default_seed_keeps_its_fingerprint():
    """The seed counts at its default where it is not read, so a greedy run with the default
    seed is not redone after the upgrade: its engine fields are the ones every seed gave."""
    from guidealign.config.engine import EngineConfig
    from guidealign.gen.outputs import output_fields

    e = EngineConfig()
    assert output_fields(e, sampled=False) == output_fields(e, sampled=True)
    assert output_fields(e, sampled=True)["seed"] == e.seed
