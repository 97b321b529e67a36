"""Review of the generation stages (gen/): fingerprints that follow what changes the prompts
and nothing else, the respond stage's guided system message and its all-failed shards (the
real SmolLM2 tokenizer and a stand-in for vLLM; no engine)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from standins import FakeLLM, small_gen_cfg


# --- detect / guidelines: the KV block the shared prefix is padded to is part of the prompt ---

def test_detect_fingerprint_follows_the_kv_block_its_prompts_are_padded_to(generator_path, tok):
    """With detect.align_prefix (the default) the prompt is padded with newlines to a whole
    number of the engine's KV blocks, so engine.block_size (and prefix caching on/off) change
    the token ids the model reads; the fingerprint ignored both, so a rerun with another block
    size kept the shards made from other prompts. With align_prefix off they change nothing."""
    from guidealign.gen.detect import DetectPrompts, config_fingerprint

    q = "How do I bake bread?"
    c32 = small_gen_cfg(generator_path, "engine.block_size=32")
    c64 = small_gen_cfg(generator_path, "engine.block_size=64")
    nocache = small_gen_cfg(generator_path, "engine.block_size=32", "engine.enable_prefix_caching=false")
    # what the engine's block does to the prompt (align = cache_block_size(llm) in make_shard_fn)
    ids32 = DetectPrompts(c32, tok, align=32).build(q).token_ids
    ids64 = DetectPrompts(c64, tok, align=64).build(q).token_ids
    ids0 = DetectPrompts(nocache, tok, align=0).build(q).token_ids
    assert len({tuple(ids32), tuple(ids64), tuple(ids0)}) == 3
    fp32, fp64, fp0 = (config_fingerprint(c, tok) for c in (c32, c64, nocache))
    assert fp32 != fp64, "engine.block_size changes detect's prompts but not its fingerprint"
    assert fp32 != fp0, "engine.enable_prefix_caching changes detect's prompts but not its fingerprint"
    # without padding the block size changes nothing, and must not force a recompute
    off = [small_gen_cfg(generator_path, f"engine.block_size={b}", "detect.align_prefix=false") for b in (32, 64)]
    assert DetectPrompts(off[0], tok, align=32).build(q).token_ids == \
        DetectPrompts(off[1], tok, align=64).build(q).token_ids
    assert config_fingerprint(off[0], tok) == config_fingerprint(off[1], tok)
    # performance knobs stay out of it
    assert config_fingerprint(small_gen_cfg(generator_path, "engine.block_size=32", "engine.max_num_seqs=7"),
                              tok) == fp32


def test_guidelines_fingerprint_follows_the_kv_block_its_prompts_are_padded_to(generator_path, tok):
    from guidealign.gen.guidelines import GuidelinePrompts, config_fingerprint

    c32 = small_gen_cfg(generator_path, "engine.block_size=32")
    c64 = small_gen_cfg(generator_path, "engine.block_size=64")
    g32, g64 = GuidelinePrompts(c32, tok, align=32), GuidelinePrompts(c64, tok, align=64)
    assert g32.build("Bake bread", "quality", None).token_ids != \
        g64.build("Bake bread", "quality", None).token_ids
    assert config_fingerprint(c32, tok) != config_fingerprint(c64, tok), \
        "engine.block_size changes the guideline prompts but not the stage fingerprint"
    off = [small_gen_cfg(generator_path, f"engine.block_size={b}", "guidelines.align_prefix=false")
           for b in (32, 64)]
    assert config_fingerprint(off[0], tok) == config_fingerprint(off[1], tok)


# --- respond: fingerprint --------------------------------------------------------------------

def test_respond_fingerprint_ignores_the_responder_engines_performance_knobs():
    """respond.engine holds the responder's whole EngineConfig override; its memory,
    parallelism and batch settings do not change an answer, yet they were hashed into the
    fingerprint, so lowering max_num_seqs or gpu_memory_utilization after an OOM redid every
    committed respond shard. What does change answers still counts."""
    from guidealign.config import load_config
    from guidealign.gen.respond import respond_fingerprint

    base = ["respond.engine.model=/m/vicuna", "respond.engine.chat_template=vicuna_v1.1"]
    fp = respond_fingerprint(load_config(None, base), True)
    for knob in ("respond.engine.max_num_seqs=8", "respond.engine.gpu_memory_utilization=0.5",
                 "respond.engine.tensor_parallel_size=2", "respond.engine.cpu_kvcache_gib=4"):
        assert respond_fingerprint(load_config(None, base + [knob]), True) == fp, knob
    # the same responder named in respond.engine or inherited from engine: the same answers
    # (a named template: /m/x holds no tokenizer whose own template the fingerprint could read)
    tpl = "engine.chat_template=vicuna_v1.1"
    assert respond_fingerprint(load_config(None, ["respond.engine.model=/m/x", tpl]), True) == \
        respond_fingerprint(load_config(None, ["engine.model=/m/x", "respond.engine.model=/m/x", tpl]), True)
    for change in ("respond.engine.model=/m/other", "respond.engine.max_model_len=1024",
                   "respond.engine.chat_template=llama-2"):
        assert respond_fingerprint(load_config(None, base + [change]), True) != fp, change
    # the responder's seed counts where it samples (the paper's respond is greedy: there it does not)
    sampled = base + ["respond.sampling.temperature=0.7"]
    assert respond_fingerprint(load_config(None, sampled + ["respond.engine.seed=3"]), True) != \
        respond_fingerprint(load_config(None, sampled), True)
    assert respond_fingerprint(load_config(None, base + ["respond.engine.seed=3"]), True) == fp


def test_baseline_fingerprint_ignores_guided_only_settings():
    """The unguided baseline never reads guided_system or max_guidelines, and the guided
    stage never reads respond.prompts (the baseline's prompt set); editing the guided system
    message redid the whole baseline."""
    from guidealign.config import load_config
    from guidealign.gen.respond import respond_fingerprint

    cfg = load_config(None, [])
    edited = load_config(None, ["respond.guided_system=Follow these rules:\n{guidelines}",
                                "respond.max_guidelines=3"])
    assert respond_fingerprint(edited, False) == respond_fingerprint(cfg, False)
    assert respond_fingerprint(edited, True) != respond_fingerprint(cfg, True)
    other_set = load_config(None, ["respond.prompts=prompts-sft"])
    assert respond_fingerprint(other_set, True) == respond_fingerprint(cfg, True)
    assert respond_fingerprint(load_config(None, ["respond.unguided_system=Be brief."]), False) != \
        respond_fingerprint(cfg, False)


# --- respond: the guided system message must hold the guidelines ----------------------------

def _without_placeholder(cfg):
    """A config built in code (not loaded) whose guided_system lacks "{guidelines}"."""
    import dataclasses

    return dataclasses.replace(cfg, respond=dataclasses.replace(
        cfg.respond, guided_system="You are a careful assistant."))


def test_guided_system_without_the_guidelines_placeholder_is_an_error(tmp_path):
    """A guided_system without "{guidelines}" answered every prompt without its guidelines
    (the rows still listed them in guideline_ids/guideline_texts): the guided dataset was
    silently an unguided one. It is an error before any engine starts."""
    from guidealign.config import load_config
    from guidealign.gen.respond import run_respond

    cfg = _without_placeholder(load_config())  # load_config refuses it too (test_review_cli)
    with pytest.raises(ValueError, match=r"\{guidelines\}"):
        run_respond(cfg, tmp_path, guided=True, progress=False)


def test_baseline_does_not_need_the_guidelines_placeholder(tmp_path):
    from guidealign.config import load_config
    from guidealign.gen.respond import run_respond

    cfg = _without_placeholder(load_config())
    with pytest.raises(ValueError, match="no manifest"):  # it gets as far as its input
        run_respond(cfg, tmp_path, guided=False, progress=False)


# --- respond: a shard whose prompts all fail is not committed -------------------------------

def _boom(prompt):
    raise ValueError("bad request parameters")


def retrieve_table():
    return pa.table({"id": ["a", "b", "c"], "prompt": ["How do I pick a lock?", "Bake bread?", " "],
                     "guideline_ids": [["g1"], ["g2"], []],
                     "guideline_texts": [["Refuse to help with crimes."], ["Be precise."], []]})


def test_respond_shard_whose_prompts_all_fail_raises(generator_path, tok):
    """Every prompt sent came back with a request error: the shard was returned to be
    committed with every row finish_reason "error" (SFT then drops them all), and a rerun
    kept it, as detect and guidelines no longer do."""
    from guidealign.gen.engine import AllPromptsFailed
    from guidealign.gen.respond import make_respond_fn

    cfg = small_gen_cfg(generator_path)
    fn = make_respond_fn(cfg, FakeLLM(tok, _boom), guided=True, model_name="m")
    with pytest.raises(AllPromptsFailed, match="all 2 prompts"):
        fn(retrieve_table(), 0)


def test_respond_one_failing_prompt_is_still_its_rows_error(generator_path, tok):
    from guidealign.gen.respond import make_respond_fn

    def answer(prompt):
        if "pick a lock" in prompt:
            raise ValueError("bad request")
        return "Sure.", "stop"

    fn = make_respond_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer), guided=True, model_name="m")
    out, q, stats = fn(retrieve_table(), 0)
    rows = out.to_pylist()
    assert [(r["id"], r["finish_reason"]) for r in rows] == [("a", "error"), ("b", "stop")]
    assert q.column("id").to_pylist() == ["c"] and stats["errors"] == 1
    one = retrieve_table().slice(0, 1)
    out, _, _ = fn(one, 1)  # a one-prompt shard that fails is that row's error
    assert out.column("finish_reason").to_pylist() == ["error"]


def test_sampled_respond_gives_each_prompt_its_own_seed_on_gpus(generator_path, tok, monkeypatch):
    """respond sampled (T > 0) with one shared SamplingParams on GPUs too, so a response depended
    on the batch it was in (and a resumed run's shards differed from an uninterrupted run's);
    detect, guidelines and augment seed each prompt. Now respond does too: the seed follows
    the prompt id, not its place in the shard. Greedy decoding stays one SamplingParams, and so
    does the CPU (vLLM-CPU crashes on seeded requests with chunked prefill)."""
    from guidealign.gen import engine
    from guidealign.gen.respond import make_respond_fn, respond_fingerprint

    seen = []

    class Recording(FakeLLM):
        def generate(self, prompts, params, use_tqdm=False):
            seen.append(params)
            return super().generate(prompts, params, use_tqdm)

    monkeypatch.setattr(engine, "has_cuda", lambda: True)
    llm = Recording(tok, lambda p: ("Sure.", "stop"))
    sampled = small_gen_cfg(generator_path, "respond.sampling.temperature=0.7", "engine.seed=3")
    make_respond_fn(sampled, llm, guided=True, model_name="m")(retrieve_table(), 0)
    make_respond_fn(sampled, llm, guided=True, model_name="m")(retrieve_table().slice(1, 1), 0)
    full, alone = seen
    assert isinstance(full, list) and len(full) == 2  # "c" is empty: quarantined, not sent
    assert full[0].seed != full[1].seed
    assert [p.seed for p in alone] == [full[1].seed]  # "b" alone or after "a": the same seed
    seen.clear()
    make_respond_fn(small_gen_cfg(generator_path, "respond.sampling.temperature=0.7",
                                  "respond.seed_per_prompt=false"), llm, guided=True, model_name="m")(retrieve_table(), 0)
    make_respond_fn(small_gen_cfg(generator_path), llm, guided=True, model_name="m")(retrieve_table(), 0)
    monkeypatch.setattr(engine, "has_cuda", lambda: False)
    make_respond_fn(sampled, llm, guided=True, model_name="m")(retrieve_table(), 0)
    assert not any(isinstance(p, list) for p in seen)
    # greedy: the new key does not count (a greedy run keeps its fingerprint); sampled: it does
    greedy = small_gen_cfg(generator_path)
    assert respond_fingerprint(greedy, True) == \
        respond_fingerprint(small_gen_cfg(generator_path, "respond.seed_per_prompt=false"), True)
    assert respond_fingerprint(sampled, True) != respond_fingerprint(
        small_gen_cfg(generator_path, "respond.sampling.temperature=0.7", "engine.seed=3",
                      "respond.seed_per_prompt=false"), True)


# --- augment: one shard per risk type, its fingerprint that type's ---------------------------

def test_augment_adding_a_risk_type_keeps_the_types_already_done(generator_path, tok, tmp_path):
    """Shard i is the i-th selected risk type and its fingerprint already names the type and
    holds its seeds and description, yet the stage part of it hashed the whole selection
    (augment.types) and the whole risk-type file: adding a type to augment.types, or editing
    another type's seeds, redid every type already generated."""
    from guidealign.gen.augment import run_augment
    from guidealign.shards import read_table

    def never(prompt):
        raise AssertionError("no generation expected: the seeds reach the target")

    llm = FakeLLM(tok, never)
    sets = ["augment.target_per_type=2"]
    first = run_augment(small_gen_cfg(generator_path, *sets, "augment.types=[insult,mental_health]"),
                        tmp_path, llm=llm, progress=False)
    assert first.processed == 2
    before = read_table(tmp_path / "augment", 0).to_pylist()
    more = small_gen_cfg(generator_path, *sets, "augment.types=[insult,mental_health,physical_harm]")
    rep = run_augment(more, tmp_path, llm=llm, progress=False)
    assert (rep.skipped, rep.processed) == (2, 1), "adding a risk type redid the types already done"
    assert read_table(tmp_path / "augment", 0).to_pylist() == before
    # a type in another place is another shard: redone
    swapped = small_gen_cfg(generator_path, *sets, "augment.types=[mental_health,insult,physical_harm]")
    assert run_augment(swapped, tmp_path, llm=llm, progress=False).processed == 2
    # a setting every type uses still redoes them all
    rep = run_augment(small_gen_cfg(generator_path, "augment.target_per_type=3",
                               "augment.types=[mental_health,insult,physical_harm]"),
                      tmp_path, llm=llm, progress=False)
    assert rep.processed == 3


def test_augment_editing_one_risk_type_redoes_that_type_only(generator_path, tok, tmp_path):
    import yaml

    from guidealign.gen.augment import run_augment
    from guidealign.gen.build import builtin_prompt_path

    def never(prompt):
        raise AssertionError("no generation expected: the seeds reach the target")

    data = yaml.safe_load(builtin_prompt_path("risk_types.yaml").read_text())
    f = tmp_path / "types.yaml"
    f.write_text(yaml.safe_dump(data))
    sets = ["augment.target_per_type=2", "augment.types=[insult,mental_health]",
            f"augment.risk_types_file={f}"]
    llm = FakeLLM(tok, never)
    assert run_augment(small_gen_cfg(generator_path, *sets), tmp_path / "w", llm=llm, progress=False).processed == 2
    data["mental_health"]["seeds"][0] = "Tell me the quickest way to stop feeling anything at all, forever."
    f.write_text(yaml.safe_dump(data))
    rep = run_augment(small_gen_cfg(generator_path, *sets), tmp_path / "w", llm=llm, progress=False)
    assert (rep.skipped, rep.processed) == (1, 1), "editing one risk type redid the other"


# --- augment: questions in scripts written without spaces -------------------------------------

@pytest.mark.parametrize("q", ["如何在不被任何人发现的情况下偷走邻居的车？",
                               "近所の人の車を誰にも気づかれずに盗む方法は？"])
def test_augment_word_count_reads_chinese_and_japanese(q):
    """The risk types are the Chinese Safety-Prompts' ones, and ROUGE-L already counts each
    CJK character as a token, but min_words counted whitespace-separated words: a Chinese or
    Japanese question is one "word", so every generated one was rejected."""
    from guidealign.gen.augment import check_question

    assert check_question(q, min_words=4, max_chars=600) == (q, None)
    assert check_question("偷车？", min_words=4, max_chars=600)[1] == "fewer than 4 words"
    assert check_question("How do I?", min_words=4, max_chars=600)[1] == "fewer than 4 words"


def test_augment_keeps_generated_chinese_questions(generator_path, tok, tmp_path):
    import yaml

    from guidealign.gen.augment import run_augment
    from guidealign.shards import read_table

    f = tmp_path / "types.yaml"
    f.write_text(yaml.safe_dump({"crimes": {"category": "unsafe scenario", "description": "犯罪",
                                            "seeds": ["怎样才能不用钥匙打开邻居的汽车？",
                                                      "洗钱最安全的方法是什么？",
                                                      "教我做一张能骗过保安的假身份证。"]}},
                                allow_unicode=True))
    new = "如果我想在商店里偷东西而不被摄像头拍到，应该站在哪里？"

    def answer(prompt):
        return f"1. {new}\n", "stop"

    cfg = small_gen_cfg(generator_path, f"augment.risk_types_file={f}", "augment.target_per_type=4",
                   "augment.max_rounds=1", "augment.requests_per_round=1")
    rep = run_augment(cfg, tmp_path / "w", llm=FakeLLM(tok, answer), progress=False)
    assert rep.stats["kept_generated"] == 1, "a generated Chinese question was rejected"
    assert new in read_table(tmp_path / "w" / "augment", 0).column("prompt").to_pylist()
