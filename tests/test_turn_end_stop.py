"""Generation stops where the chat template ends an assistant turn, also when that is not the
tokenizer's eos (chatml on a Qwen-style tokenizer: turns end with <|im_end|>, eos is
<|endoftext|>). The engine stops at eos only, so without this the model runs on into made-up
"user"/"system" turns until the length cap. Real vLLM engine on a copy of the embedded
SmolLM2 whose eos is set to <|endoftext|> (greedy, float32: deterministic)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import engine_config


@pytest.fixture(scope="module")
def qwen_style(generator_path, module_tmp) -> Path:
    dst = module_tmp.mktemp("qwen-style") / "model"
    shutil.copytree(generator_path, dst)
    for name in ("config.json", "generation_config.json"):
        d = json.loads((dst / name).read_text())
        d["eos_token_id"] = 0  # <|endoftext|>
        (dst / name).write_text(json.dumps(d))
    t = json.loads((dst / "tokenizer_config.json").read_text())
    t["eos_token"] = "<|endoftext|>"
    (dst / "tokenizer_config.json").write_text(json.dumps(t))
    return dst


def test_turn_end_stop_only_where_the_turn_end_is_not_eos(generator_path, qwen_style, embedder_path):
    from transformers import AutoTokenizer

    from guidealign.gen.templates import turn_end_stop

    own = AutoTokenizer.from_pretrained(generator_path)
    assert own.eos_token == "<|im_end|>"
    assert turn_end_stop(own, "chatml") == ([], [])  # eos already ends the turn
    qs = AutoTokenizer.from_pretrained(qwen_style)
    assert qs.eos_token == "<|endoftext|>"
    assert turn_end_stop(qs, "chatml") == ([qs.convert_tokens_to_ids("<|im_end|>")], [])
    # the model's own template (ChatML here) ends turns with <|im_end|> too: it is found as
    # the template renders, not by a template name (a Qwen2.5 base model's own template)
    assert turn_end_stop(qs, None) == ([qs.convert_tokens_to_ids("<|im_end|>")], [])
    assert turn_end_stop(own, None) == ([], [])  # its own template, eos <|im_end|>
    assert turn_end_stop(qs, "vicuna_v1.1") == ([], [])  # ends turns with eos
    bert = AutoTokenizer.from_pretrained(embedder_path)  # no <|im_end|> token: a stop string
    assert turn_end_stop(bert, "chatml") == ([], ["<|im_end|>"])


def test_a_chatml_engine_whose_eos_is_not_im_end_stops_at_the_turn_end(qwen_style):
    from guidealign.config.gen import Sampling
    from guidealign.gen.engine import build_llm, close_llm, generate, params_for, sampling_params

    llm = build_llm(engine_config(model=str(qwen_style), chat_template="chatml", max_model_len=1024))
    try:
        tok = llm.get_tokenizer()
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello in one short sentence."}],
                                         tokenize=False, add_generation_prompt=True)
        s = Sampling(temperature=0.0, max_tokens=60)
        # without the turn end (as before): the model writes <|im_end|> and goes on
        raw = llm.generate([prompt], sampling_params(s), use_tqdm=False)[0].outputs[0]
        assert im_end in raw.token_ids[:-1] and raw.finish_reason == "length"
        cut = list(raw.token_ids).index(im_end)
        # the stages' params (detect, guidelines, augment: params_for; respond, judges:
        # sampling_params with the engine) stop there
        for params in (sampling_params(s, llm=llm), params_for(s, 0, ["a"], False, llm)):
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            assert out.finish_reason == "stop"
            assert list(out.token_ids) == list(raw.token_ids[:cut + 1])
        g = generate(llm, [prompt], sampling_params(s, llm=llm))[0]
        assert g.finish_reason == "stop" and g.output_tokens == cut + 1
    finally:
        close_llm(llm)


def test_sft_on_a_base_whose_own_template_ends_turns_before_eos_saves_that_end_as_eos(qwen_style, tmp_path):
    """SFT with sft.chat_template null on a base whose own template is ChatML but whose eos is
    <|endoftext|> (Qwen2.5 base) trained answers to end with <|im_end|> and saved eos
    <|endoftext|>: the model never stopped. Now the turn end is its eos, and the base's own
    template counts in SFT's fingerprint (editing it trains again)."""
    from guidealign.config import load_config
    from guidealign.gen.outputs import own_template
    from guidealign.sft.train import prepare_tokenizer

    scfg = load_config(None, [f"sft.base_model={qwen_style}"]).sft
    tok, added = prepare_tokenizer(scfg, str(qwen_style))
    assert (tok.eos_token, added) == ("<|im_end|>", [])
    before = own_template(scfg.base_model)
    assert before["turn_end"] == "<|im_end|>"
    edited = tmp_path / "edited"
    shutil.copytree(qwen_style, edited)
    t = json.loads((edited / "tokenizer_config.json").read_text())
    if "chat_template" in t:
        t["chat_template"] = t["chat_template"].replace("<|im_start|>", "<|im_start|> ", 1)
        (edited / "tokenizer_config.json").write_text(json.dumps(t))
    else:
        jinja = edited / "chat_template.jinja"
        jinja.write_text(jinja.read_text().replace("<|im_start|>", "<|im_start|> ", 1))
    after = own_template(str(edited))
    assert after["own_template"] != before["own_template"]
