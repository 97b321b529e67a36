"""Stop 57 review of SFT: the eos ids the fine-tuned model stops at. A base model whose
generation config lists several (Llama 3: <|end_of_text|> and <|eot_id|>; Qwen2.5-Instruct:
<|im_end|> and <|endoftext|>) kept only the template's turn end after SFT, so vLLM and
transformers no longer stopped at the others; a base whose eos is not the turn end (a Qwen2.5
base: <|endoftext|>, turns end with <|im_end|>) lost its own. Tiny Llamas with the embedded
SmolLM2's tokenizer (<|endoftext|> = 0, <|im_end|> = 2) stand in for such bases."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_s56_sft import tiny_sft_cfg
from test_sft import respond_rows, write_respond

ENDOFTEXT, IM_END = 0, 2


def tiny_smollm_base(d: Path, generator_path: str, *, eos, gen_eos, tok_eos: str | None = None) -> Path:
    """A two-layer Llama with SmolLM2's tokenizer (and ChatML template) in ``d``: config.json's
    eos_token_id ``eos``, generation_config.json's ``gen_eos``; ``tok_eos`` replaces the
    tokenizer's eos token (Qwen2.5 base models': <|endoftext|>)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    d.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(generator_path) / name).exists():
            shutil.copy(Path(generator_path) / name, d / name)
    if tok_eos:
        t = json.loads((d / "tokenizer_config.json").read_text())
        t["eos_token"] = tok_eos
        (d / "tokenizer_config.json").write_text(json.dumps(t))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                 bos_token_id=1, eos_token_id=eos, tie_word_embeddings=True)).save_pretrained(d)
    GenerationConfig(bos_token_id=1, eos_token_id=gen_eos).save_pretrained(d)
    return d


def train(workdir: Path, base: Path, *overrides) -> Path:
    from guidealign.sft.train import run_sft

    write_respond(workdir, [respond_rows(2)[0]])
    cfg = tiny_sft_cfg(str(base), "sft.chat_template=chatml", "sft.max_seq_length=512", *overrides)
    run_sft(cfg, workdir, progress=False)
    return workdir / "sft" / "model"


def eos_ids(model_dir: Path, name: str) -> list[int]:
    ids = json.loads((model_dir / name).read_text())["eos_token_id"]
    return [ids] if isinstance(ids, int) else list(ids)


def answer_end_id(model_dir: Path) -> int:
    """The last control token of a trained answer (its completion), as SFT tokenizes it with
    the saved tokenizer: the turn end the chat template writes."""
    from transformers import AutoTokenizer

    from guidealign.sft.data import prompt_builder, tokenize_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex = tokenize_example(prompt_builder(tok), {"prompt": [{"role": "user", "content": "Hi"}],
                                                "completion": [{"role": "assistant", "content": "Hello"}]})
    done = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m]
    return next(t for t in reversed(done) if t in tok.all_special_ids)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_every_eos_id_a_base_generation_config_lists_stays_after_sft(tmp_path, workdir, generator_path, mode):
    """Llama 3-style: config.json and generation_config.json list two eos ids, <|endoftext|>
    and the turn end (<|im_end|>, the tokenizer's eos), in Llama 3's order (<|eot_id|> last).
    The SFT model kept <|im_end|> only."""
    both = [ENDOFTEXT, IM_END]
    base = tiny_smollm_base(tmp_path / "base", generator_path, eos=both, gen_eos=both)
    model = train(workdir, base, f"sft.mode={mode}", "sft.merge_lora=true")
    for name in ("config.json", "generation_config.json"):
        # the tokenizer's eos first: the turn end the answers are trained to end with
        assert eos_ids(model, name) == [IM_END, ENDOFTEXT], name
    assert answer_end_id(model) == IM_END


def test_a_base_that_lists_several_eos_only_in_its_generation_config_keeps_them(tmp_path, workdir, generator_path):
    """Qwen2.5-Instruct-style: config.json has one eos id, generation_config.json (which vLLM
    and transformers stop at) two: both stay there; config.json keeps its one id."""
    base = tiny_smollm_base(tmp_path / "base", generator_path, eos=IM_END, gen_eos=[IM_END, ENDOFTEXT])
    model = train(workdir, base)
    assert eos_ids(model, "generation_config.json") == [IM_END, ENDOFTEXT]
    assert json.loads((model / "config.json").read_text())["eos_token_id"] == IM_END


def test_a_base_whose_eos_is_not_the_turn_end_keeps_its_eos_and_stops_at_the_turn_end(tmp_path, workdir,
                                                                                        generator_path):
    """Qwen2.5 base-style: eos <|endoftext|> everywhere, the chat template ends turns with
    <|im_end|>. The answers are trained to end with <|im_end|>, the saved tokenizer's and
    config.json's eos; generation_config.json lists it first and keeps the base's own
    <|endoftext|> (it was replaced)."""
    from transformers import AutoTokenizer

    base = tiny_smollm_base(tmp_path / "base", generator_path, eos=ENDOFTEXT, gen_eos=ENDOFTEXT,
                            tok_eos="<|endoftext|>")
    model = train(workdir, base)
    assert answer_end_id(model) == IM_END == AutoTokenizer.from_pretrained(model).eos_token_id
    assert json.loads((model / "config.json").read_text())["eos_token_id"] == IM_END
    assert eos_ids(model, "generation_config.json") == [IM_END, ENDOFTEXT]


def test_a_single_eos_base_keeps_one_eos_id(tmp_path, workdir, generator_path):
    """SmolLM2-style: one eos, the turn end: config.json and generation_config.json keep it as
    the one id it was (not a list)."""
    base = tiny_smollm_base(tmp_path / "base", generator_path, eos=IM_END, gen_eos=IM_END)
    model = train(workdir, base)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((model / name).read_text())["eos_token_id"] == IM_END, name
