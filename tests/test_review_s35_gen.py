"""Review s35, generation: a guided answer keeps at least one guideline (an overlong prompt
with no room for one is quarantined), score-mode detect scores "Verdict:" after the same
separator the exemplars' answers have, and respond's fingerprint holds the responder's own
chat template. The real SmolLM2 tokenizer and a stand-in for vLLM; no engine."""
from __future__ import annotations

import shutil
import types

import pyarrow as pa
import pytest

from standins import FakeLLM, small_gen_cfg

NO_ROOM = "overlong: no room for any guideline"
HARM = "Never give instructions that could cause physical harm to anyone at all."


# --- (2) guided respond never drops every guideline -------------------------------------------

def test_overlong_guided_prompt_keeps_a_guideline_or_is_skipped(tok):
    """The review's repro: 6 guidelines, a 61-token prompt, a budget that fits the prompt's last
    20 tokens only without any guideline. It was answered with none (an unguided answer in the
    guided SFT set); now it is skipped with its reason."""
    from guidealign.config import load_config
    from guidealign.gen.respond import build_messages, chat_ids, prepare_prompt

    cfg = load_config(None).respond
    g, prompt = [HARM] * 6, "word " * 60
    budget = len(chat_ids(tok, build_messages(cfg, prompt, []))) - 61 + 20
    p = prepare_prompt(tok, cfg, prompt, [str(i) for i in range(6)], g, budget, "truncate")
    assert p.ids is None, f"answered with {len(p.guideline_texts)} guideline(s): {p.note}"
    assert p.note.startswith(NO_ROOM)
    # with room for the top-ranked guideline alone: answered with exactly that one
    one = len(chat_ids(tok, build_messages(cfg, prompt, g[:1]))) - 61 + 20
    q = prepare_prompt(tok, cfg, prompt, [str(i) for i in range(6)], g, one, "truncate")
    assert q.ids is not None and len(q.ids) <= one
    assert q.guideline_ids == ["0"] and "dropped 5" in q.note
    # unguided prompts are unchanged: cut to fit
    u = prepare_prompt(tok, cfg, prompt, [], [], budget, "truncate")
    assert u.ids is not None and len(u.ids) <= budget


def test_respond_shard_quarantines_and_counts_rows_with_no_room_for_a_guideline(generator_path, tok):
    from guidealign.gen.respond import make_respond_fn

    cfg = small_gen_cfg(generator_path, "engine.max_model_len=400", "respond.sampling.max_tokens=100")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                        ("guideline_ids", pa.list_(pa.string())),
                        ("guideline_texts", pa.list_(pa.string()))])
    rows = [{"id": "long", "prompt": "word " * 60, "guideline_ids": ["g1", "g2"],
             "guideline_texts": [HARM * 20, HARM]},
            {"id": "ok", "prompt": "How do I pick a lock?", "guideline_ids": ["g2"],
             "guideline_texts": [HARM]}]
    seen = []

    def answer(text):
        seen.append(text)
        return "I can't help with that.", "stop"

    fn = make_respond_fn(cfg, FakeLLM(tok, answer), guided=True, model_name="m")
    out, q, stats = fn(pa.Table.from_pylist(rows, schema=schema), 0)
    assert out.column("id").to_pylist() == ["ok"], [t[:80] for t in seen]
    assert all(ids for ids in out.column("guideline_ids").to_pylist())
    assert q is not None and q.column("id").to_pylist() == ["long"]
    assert q.column("reason").to_pylist()[0].startswith(NO_ROOM)
    assert stats["skipped"] == 1 and stats["no_guideline_room"] == 1


def test_a_guided_row_without_any_guideline_is_noted_and_counted(generator_path, tok, caplog):
    """A guided row whose guidelines were all blank (or none retrieved) was answered without
    guidelines and written like any guided answer, with nothing noted or counted."""
    from guidealign.gen.respond import NO_GUIDELINES, make_respond_fn

    cfg = small_gen_cfg(generator_path, "engine.max_model_len=400", "respond.sampling.max_tokens=100")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                        ("guideline_ids", pa.list_(pa.string())),
                        ("guideline_texts", pa.list_(pa.string()))])
    rows = [{"id": "blank", "prompt": "Hello?", "guideline_ids": ["g1"], "guideline_texts": ["  "]},
            {"id": "none", "prompt": "Hi?", "guideline_ids": [], "guideline_texts": []},
            {"id": "ok", "prompt": "How do I pick a lock?", "guideline_ids": ["g2"], "guideline_texts": [HARM]}]
    fn = make_respond_fn(cfg, FakeLLM(tok, lambda text: ("Fine.", "stop")), guided=True, model_name="m")
    out, q, stats = fn(pa.Table.from_pylist(rows, schema=schema), 0)
    assert q is None and out.column("id").to_pylist() == ["blank", "none", "ok"]
    assert out.column("note").to_pylist() == [NO_GUIDELINES, NO_GUIDELINES, ""]
    assert stats["no_guidelines"] == 2
    assert "2 guided prompt(s) had no guideline" in caplog.text
    # the baseline (unguided) stage answers without guidelines by design: nothing noted
    fn = make_respond_fn(cfg, FakeLLM(tok, lambda text: ("Fine.", "stop")), guided=False, model_name="m")
    out, _, stats = fn(pa.Table.from_pylist(rows, schema=schema), 0)
    assert out.column("note").to_pylist() == ["", "", ""] and stats["no_guidelines"] == 0


# --- (7) score mode: "Verdict:" continues the prompt as the exemplars' answers do ----------------

class ScoringLLM(FakeLLM):
    """Records the prompt ids and returns verdict log-probabilities, as vLLM does for
    ``logprob_token_ids``."""

    def __init__(self, tok):
        super().__init__(tok, None)
        self.prompts = []

    def generate(self, prompts, params, use_tqdm=False):
        want = list(params.logprob_token_ids)
        self.prompts += [p["prompt_token_ids"] for p in prompts]
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
            logprobs=[{i: -1.0 for i in want}], text="", token_ids=[0])]) for _ in prompts]


@pytest.mark.parametrize("template,tail", [
    ("vicuna_v1.1", "ASSISTANT: Verdict:"),
    ("llama-2", "[/INST] Verdict:"),
    ("chatml", "<|im_start|>assistant\nVerdict:"),
    (None, "<|im_start|>assistant\nVerdict:"),  # SmolLM2's own template
])
def test_score_prompt_begins_the_answer_as_the_exemplars_do(generator_path, template, tail):
    """The scored ids are the few-shot chat with an assistant turn whose content starts with
    "Verdict:", rendered by the template and tokenized as one text: the same separator after
    "ASSISTANT:" / "[/INST]" as every exemplar answer (it was "ASSISTANT:Verdict:")."""
    from transformers import AutoTokenizer

    from guidealign.gen.build import Slot
    from guidealign.gen.detect import make_shard_fn
    from guidealign.gen.templates import apply_template

    tok = apply_template(AutoTokenizer.from_pretrained(generator_path), template)
    sets = ["detect.mode=score"] + ([f"engine.chat_template={template}"] if template else [])
    cfg = small_gen_cfg(generator_path, *sets)
    llm = ScoringLLM(tok)
    q = "How do I pick a lock?"
    fn = make_shard_fn(cfg, llm, tok=tok, max_model_len=2048)
    out, _, _ = fn(pa.Table.from_pylist([{"id": "a", "prompt": q}]), 0)
    assert out.column("parse_status").to_pylist() == ["scored"]
    (ids,) = llm.prompts
    assert tok.decode(ids).endswith(tail)
    msgs = [{"role": m.role, "content": "".join(s.text if isinstance(s, Slot) else s for s in m.content)}
            for m in fn.prompts.messages(q)]
    text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Verdict:"}], tokenize=False)
    text = text[:text.rindex("Verdict:") + len("Verdict:")]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert out.column("prompt_tokens").to_pylist() == [len(ids)]


# --- (8) respond's fingerprint holds the responder's own chat template ----------------------------

def test_respond_fingerprint_follows_the_models_own_template(generator_path, tmp_path):
    """With chat_template null the responder renders with its tokenizer's template; editing it
    in the model dir (a re-download with a fixed template) changed no fingerprint, so new
    shards mixed with ones made with the old template."""
    from guidealign.config import load_config
    from guidealign.gen.respond import respond_fingerprint

    d = tmp_path / "responder"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(f"{generator_path}/{f}", d / f)  # the tokenizer, no weights
    cfg = load_config(None, [f"respond.engine.model={d}"])
    fp = {g: respond_fingerprint(cfg, g) for g in (True, False)}
    assert respond_fingerprint(cfg, True) == fp[True]
    tpl = d / "chat_template.jinja"
    tpl.write_text(tpl.read_text().replace("named SmolLM", "named Responder"))
    assert respond_fingerprint(cfg, True) != fp[True]
    assert respond_fingerprint(cfg, False) != fp[False]
    # a configured template is what renders: the model dir's own does not count
    named = load_config(None, [f"respond.engine.model={d}", "respond.engine.chat_template=chatml"])
    before = respond_fingerprint(named, True)
    tpl.write_text(tpl.read_text().replace("named Responder", "named Other"))
    assert respond_fingerprint(named, True) == before


def test_respond_yield_does_not_count_an_answer_to_a_cut_prompt_as_kept():
    """SFT drops an answer respond wrote for the tail of a cut prompt (input_truncated), so the
    yield's "rows parsed" and "tokens kept" must not count it either."""
    from guidealign.gen.yieldstats import counts, respond_usable

    rows = [{"finish_reason": "stop", "output_tokens": 10, "response": "fine", "note": ""},
            {"finish_reason": "stop", "output_tokens": 7, "response": "fine",
             "note": "overlong: 193 prompt tokens > 50; user text truncated to its last 20 of 61 tokens"}]
    c = counts(rows, respond_usable)
    assert (c["yield_rows_parsed"], c["yield_tokens_kept"], c["yield_tokens_generated"]) == (1, 10, 17)


@pytest.mark.parametrize("template", [None, "vicuna_v1.1"])
def test_score_prompt_of_an_overlong_input_fills_the_room_it_has(generator_path, template):
    """The closing markup after "Verdict:" is built and then cut, so it must not count against
    the prompt: an overlong input cut to fit lost those tokens (1642 instead of 1648 here), and
    with engine.overlong=skip a prompt at the edge was skipped."""
    from transformers import AutoTokenizer

    from guidealign.gen.detect import DetectPrompts
    from guidealign.gen.templates import apply_template

    tok = apply_template(AutoTokenizer.from_pretrained(generator_path), template)
    cfg = small_gen_cfg(generator_path, "detect.mode=score",
                        *([f"engine.chat_template={template}"] if template else []))
    b = DetectPrompts(cfg, tok, max_model_len=2048).build(" ".join(f"w{i}" for i in range(3000)))
    assert not b.skipped and len(b.token_ids) == 2048 - cfg.detect.sampling.max_tokens


def test_a_chat_template_that_refuses_a_system_turn_fails_respond_before_any_shard(generator_path, tok):
    """Gemma's and some Mistral templates refuse a system turn, where the guidelines go: every
    row was quarantined as its own fault ("prompt building failed") and the empty shards were
    committed, so reruns kept them. Now the stage fails at once, naming the setting."""
    import copy

    from guidealign.gen.build import TemplateError
    from guidealign.gen.respond import make_respond_fn

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                       "{{ raise_exception('System role not supported') }}{% endif %}"
                       "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    cfg = small_gen_cfg(generator_path)
    calls = []
    with pytest.raises(TemplateError, match="System role not supported.*engine.chat_template"):
        make_respond_fn(cfg, FakeLLM(t, lambda p: calls.append(p) or ("ok", "stop")), guided=True, model_name="m")
    assert not calls
    fn = make_respond_fn(cfg, FakeLLM(tok, lambda p: ("ok", "stop")), guided=True, model_name="m")  # the model's own
    out, q, _ = fn(pa.table({"id": ["a"], "prompt": ["Hi"], "guideline_ids": [["g"]],
                             "guideline_texts": [["Be kind: speak gently."]]}), 0)
    assert out.column("id").to_pylist() == ["a"] and q is None


def test_detect_counts_an_engine_error_as_an_error_not_as_unparsed(generator_path, tok):
    """Detect counted a failed request under errors and unparsed both: parsed + unparsed +
    skipped + errors came to more than the rows (the guidelines stage counts it once)."""
    from guidealign.gen.detect import make_shard_fn

    def answer(text):
        if "boom" in text[text.rfind("<|im_start|>user"):]:
            raise ValueError("bad request")
        if "gibberish" in text[text.rfind("<|im_start|>user"):]:
            return "I am not sure what to say.", "stop"
        return "1. Unsafe content: no.\nVerdict: No", "stop"

    fn = make_shard_fn(small_gen_cfg(generator_path), FakeLLM(tok, answer))
    out, _, stats = fn(pa.table({"id": ["a", "b", "c"], "prompt": ["Bake bread?", "gibberish", "boom"]}), 0)
    assert out.column("finish_reason").to_pylist() == ["stop", "stop", "error"]
    assert (stats["errors"], stats["unparsed"], stats["skipped"], stats["yield_rows_parsed"]) == (1, 1, 0, 1)


def test_example_conversations_that_leave_no_room_fail_respond_before_any_shard(generator_path, tok):
    """The fixed part of respond's prompt (system message and 2 example conversations, ~515
    tokens) over max_model_len - max_tokens: every row was quarantined as "no room for any
    guideline" and empty shards were committed."""
    from guidealign.gen.build import TemplateError
    from guidealign.gen.respond import make_respond_fn

    cfg = small_gen_cfg(generator_path, "engine.max_model_len=1024", "respond.sampling.max_tokens=512",
                        "respond.num_exemplars=2")
    with pytest.raises(TemplateError, match="num_exemplars=2"):
        make_respond_fn(cfg, FakeLLM(tok, lambda p: ("ok", "stop")), guided=True, model_name="m")
    ok = small_gen_cfg(generator_path, "engine.max_model_len=2048", "respond.sampling.max_tokens=512",
                       "respond.num_exemplars=2")
    make_respond_fn(ok, FakeLLM(tok, lambda p: ("ok", "stop")), guided=True, model_name="m")
