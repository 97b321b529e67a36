"""Local stand-ins: for Hub models with the properties the paper's recipe depends on, and for
vLLM's LLM where a test checks a stage's rows, not the engine (``FakeLLM``)."""
from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path


def model_without_template(src: str | Path, dst: str | Path) -> Path:
    """A copy of a local checkpoint whose tokenizer ships no chat template (like
    Llama-2-13b-hf or Vicuna v1.5): weights linked, chat_template removed."""
    src, dst = Path(src), Path(dst)
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in ("chat_template.jinja", "chat_template.json") or not f.is_file():
            continue
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return dst


class FakeLLM:
    """What the stage functions call on vLLM's LLM: get_tokenizer and generate. ``answer``
    maps the decoded prompt to (text, finish_reason), or raises as vLLM does on a bad request."""

    def __init__(self, tok, answer):
        self.tok, self.answer = tok, answer

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            text, fr = self.answer(self.tok.decode(ids))
            outs.append(types.SimpleNamespace(
                prompt_token_ids=ids, num_cached_tokens=0,
                outputs=[types.SimpleNamespace(text=text, finish_reason=fr, token_ids=[0, 0],
                                               logprobs=None)]))
        return outs


def small_gen_cfg(generator_path, *sets):
    """The default config on the embedded generator with one exemplar per prompt (short prompts)."""
    from guidealign.config import load_config

    return load_config(None, [f"engine.model={generator_path}", "engine.max_model_len=2048",
                              "detect.max_exemplars=1", "guidelines.max_safety_exemplars=1",
                              "guidelines.max_quality_exemplars=1", *sets])
