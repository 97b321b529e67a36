"""Local stand-ins for Hub models with the properties the paper's recipe depends on."""
from __future__ import annotations

import json
import os
import shutil
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
