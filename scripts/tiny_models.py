"""Tiny random-weight models for a smoke run of the GPU path where no hub can be reached and
the real weights cannot travel (scripts/gpu_smoke.sh): they exercise loading, devices, dtypes,
training and saving, not quality.

    python scripts/tiny_models.py OUT

writes OUT/llm-chat (a 2-layer Llama with SmolLM2's tokenizer and chat template, tied head,
bf16), OUT/llm-base (a Llama-2-like base: byte-level tokenizer with <s>/</s> and no chat
template or chatml tokens, untied head), OUT/encoder (a sentence-transformers bi-encoder:
2-layer BERT with MiniLM's tokenizer, mean pooling, normalized) and OUT/classifier (a 2-label
BERT sequence classifier). The tokenizers come from the embedded default models.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def llm_chat(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def llm_base(out: Path) -> None:
    """Llama-2's shape of problem: no chat template, no pad token, no chatml tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096}))
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)  # Llama-2 ships fp16


def _bert(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=512, **kw)


def encoder(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertModel

    raw = out.parent / (out.name + ".raw")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(2)
    BertModel(_bert(len(tok))).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=128)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu").save(str(out))
    shutil.rmtree(raw)


def classifier(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(3)
    BertForSequenceClassification(_bert(len(tok), num_labels=2)).save_pretrained(out)
    tok.save_pretrained(out)


def main(out: str) -> None:
    from guidealign.core.models import resolve

    root = Path(out)
    smol = Path(resolve("embedded:smollm2-135m-instruct"))
    minilm = Path(resolve("embedded:all-minilm-l6-v2"))
    llm_chat(root / "llm-chat", smol)
    llm_base(root / "llm-base")
    encoder(root / "encoder", minilm)
    classifier(root / "classifier", minilm)
    for d in sorted(root.iterdir()):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{d.name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1])
