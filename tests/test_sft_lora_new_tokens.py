"""LoRA SFT through TRL's trainer on a base model that lacks the chat template's tokens."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("tied", [False, True])
def test_lora_sft_trains_a_base_model_without_the_templates_tokens(tmp_path, tied):
    """chatml on a Llama-2-like base (no <|im_start|>/<|im_end|>, no pad token; the head untied
    as Llama-2's, or tied): the new tokens' rows are trained through peft's trainable tokens,
    which wraps the head (its own adapter, or the tied one); TRL's fused LM head reads
    ``lm_head.bias`` and the wrapper did not pass it on, so the first step failed
    (AttributeError), tied or not. Two real optimizer steps run, and the new rows of the input
    embeddings and, untied, of the head change."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from guidealign.config import load_config
    from guidealign.sft.data import to_example
    from guidealign.sft.train import build_trainer
    from test_templates_check import tiny_tokenizer

    d = tiny_tokenizer(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 tie_word_embeddings=tied)).save_pretrained(d)
    cfg = load_config(None, [f"sft.base_model={d}", "sft.mode=lora", "sft.chat_template=chatml",
                             "sft.num_processes=1", "sft.precision=float32", "sft.max_steps=2",
                             "sft.global_batch_size=2", "sft.micro_batch_size=1", "sft.warmup_ratio=0.0",
                             "sft.learning_rate=0.01", "sft.save_steps=0", "sft.max_seq_length=128"])
    rows = [to_example(cfg.sft, {"id": f"x{i}", "prompt": f"How do I bake bread {i}?",
                                 "response": "Mix flour, water and salt, then bake."}) for i in range(4)]
    trainer, tok2, _, _ = build_trainer(cfg, tmp_path / "run", Dataset.from_list(rows), world=1, progress=False,
                                        ckpt_dir=tmp_path / "ckpt")
    deltas = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "trainable_tokens" in n}
    assert any("embed_tokens" in n for n in deltas)
    assert any("lm_head" in n for n in deltas) != tied
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for n, before in deltas.items():
        assert not torch.equal(after[n].detach(), before), f"{n} was not trained"


def test_the_rows_of_added_tokens_come_from_sft_seed_not_the_process_state(tmp_path):
    """resize_token_embeddings drew the new tokens' rows from torch's global random state
    before anything seeded it: two runs of one config and seed started from different rows
    (and trained different models) when something else in the process had drawn numbers."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from guidealign.config import load_config
    from guidealign.sft.data import to_example
    from guidealign.sft.train import build_trainer
    from test_templates_check import tiny_tokenizer

    d = tiny_tokenizer(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    cfg = load_config(None, [f"sft.base_model={d}", "sft.chat_template=chatml", "sft.num_processes=1",
                             "sft.precision=float32", "sft.max_steps=1", "sft.global_batch_size=1",
                             "sft.micro_batch_size=1", "sft.save_steps=0", "sft.max_seq_length=128"])
    ds = Dataset.from_list([to_example(cfg.sft, {"id": "x", "prompt": "Hi?", "response": "Hello."})])
    rows = []
    for state in (1, 2):
        torch.manual_seed(state)  # whatever the process did before SFT
        trainer, tok2, _, _ = build_trainer(cfg, tmp_path / f"run{state}", ds, world=1, progress=False,
                                            ckpt_dir=tmp_path / f"ckpt{state}")
        assert len(tok2) > len(tok)  # the template's tokens were added
        rows.append(trainer.model.get_input_embeddings().weight[len(tok):].detach().clone())
    assert torch.equal(rows[0], rows[1])
