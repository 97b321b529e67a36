"""Where a configured model is, how big it is, and whether its tokenizer has a chat template,
without loading weights (for ``guidealign check``).

A model is a local dir, an ``embedded:`` name, a Hub id in the local Hub cache, or a Hub id
that would be downloaded (its size from the Hub when online; offline, "size unknown").
Parameter counts come from the safetensors metadata (local index or Hub), else the weight
files' bytes, else the size in the name ("13b", "70B").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from guidealign.core.models import model_context

# Hub ids whose tokenizer is known to ship no chat template (checked when not downloaded yet).
KNOWN_WITHOUT_TEMPLATE = (
    re.compile(r"^meta-llama/Llama-2-\d+b-hf$", re.I),
    re.compile(r"^meta-llama/Llama-2-\d+b$", re.I),
    re.compile(r"^lmsys/vicuna-\d+b-v1\.[35](-16k)?$", re.I),
    re.compile(r"^huggyllama/llama-\d+b$", re.I),
)
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "int8": 1}
_net_failed = False  # after one failed Hub lookup, the others are not tried (offline)


@dataclass
class ModelInfo:
    name: str
    where: str                  # "local", "embedded", "hub cache", "would download", "missing"
    path: str | None = None     # local dir when there is one
    download_bytes: int | None = None
    params: int | None = None
    params_source: str = ""
    template: bool | None = None  # the tokenizer ships a chat template (None: unknown)
    max_positions: int | None = None
    heads: int | None = None      # attention heads (config.json), for tensor parallelism
    notes: list[str] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.path is not None


def _offline() -> bool:
    return _net_failed or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate(name: str) -> ModelInfo:
    from guidealign.core.models import resolve

    if name.startswith("embedded:"):
        try:
            return _describe_local(ModelInfo(name, "embedded", path=resolve(name)))
        except Exception as e:  # noqa: BLE001
            return ModelInfo(name, "missing", notes=[f"embedded model unavailable: {e}"])
    from guidealign.core.models import cached_snapshot, model_ref

    try:
        kind, ref = model_ref(name)
    except ValueError as e:
        return ModelInfo(name, "missing", notes=[str(e)])
    if kind == "path":
        if ref.exists():
            return _describe_local(ModelInfo(name, "local", path=str(ref)))
        return ModelInfo(name, "missing", notes=[f"no such local path ({ref})"])

    try:
        path = cached_snapshot(name)  # complete as `guidealign models fetch` downloads it
    except Exception:  # noqa: BLE001 - not in the cache
        path = None
    if path:
        return _describe_local(ModelInfo(name, "hub cache", path=path))
    info = ModelInfo(name, "would download")
    _hub_lookup(info)
    _params_from_name(info)
    if info.template is None and any(r.match(name) for r in KNOWN_WITHOUT_TEMPLATE):
        info.template = False
        info.notes.append("its tokenizer is known to ship no chat template")
    return info


def _hub_lookup(info: ModelInfo) -> None:
    global _net_failed
    if _offline():
        info.notes.append("not in local cache; would download (offline: size unknown)")
        return
    try:
        from huggingface_hub import HfApi

        mi = HfApi().model_info(info.name, files_metadata=True, timeout=8)
    except Exception as e:  # noqa: BLE001
        _net_failed = True
        info.notes.append(f"not in local cache; would download (size unknown: {type(e).__name__})")
        return
    sizes = [s.size or 0 for s in (mi.siblings or [])]
    info.download_bytes = sum(sizes)
    st = getattr(mi, "safetensors", None)
    if st is not None and getattr(st, "total", None):
        info.params, info.params_source = int(st.total), "hub safetensors metadata"
    info.notes.append(f"not in local cache; would download {gib(info.download_bytes)}")


def _config_value(cfg: dict, key: str):
    """``key`` of a config.json, or of its ``text_config`` (multimodal models keep it there)."""
    return cfg.get(key) or (cfg.get("text_config") or {}).get(key)


def _describe_local(info: ModelInfo) -> ModelInfo:
    from guidealign.gen.templates import local_template_state

    d = Path(info.path)
    info.template = local_template_state(d)
    cfg = {}
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    info.max_positions = model_context(d, cfg)
    h = _config_value(cfg, "num_attention_heads")
    info.heads = int(h) if isinstance(h, int) and h > 0 else None
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            meta = json.loads(idx.read_text()).get("metadata", {})
            if meta.get("total_parameters"):
                info.params, info.params_source = int(meta["total_parameters"]), "safetensors index"
            elif meta.get("total_size"):
                nb = _DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2)
                info.params, info.params_source = int(meta["total_size"]) // nb, "safetensors index bytes"
        except (OSError, json.JSONDecodeError):
            pass
    if info.params is None:
        # one format only: many repos ship the same weights as .safetensors and .bin
        files = [f for f in d.glob("*.safetensors") if f.is_file()] or \
            [f for f in d.glob("*.bin") if f.is_file()]
        counted = _safetensors_params(files) if files and files[0].suffix == ".safetensors" else None
        total = sum(f.stat().st_size for f in files)
        if counted:
            info.params, info.params_source = counted, "safetensors headers"
        elif total:
            nb = _DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), 4)
            info.params, info.params_source = total // nb, "weight files"
    _params_from_name(info)
    return info


def _safetensors_params(files: list[Path]) -> int | None:
    """The parameters the safetensors files hold, from their headers (tensor shapes, whatever
    their dtype; no weights read); None when a header does not read."""
    import math

    from safetensors import SafetensorError, safe_open

    total = 0
    try:
        for f in files:
            with safe_open(str(f), framework="numpy") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    except (OSError, SafetensorError):
        return None
    return total


def _params_from_name(info: ModelInfo) -> None:
    if info.params is not None:
        return
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])", info.name.split("/")[-1])
    if m:
        info.params = int(float(m.group(1)) * (1e9 if m.group(2) in "bB" else 1e6))
        info.params_source = "size in the name"


class _FastTokenizer:
    """Counts tokens with the ``tokenizers`` library (imports in well under a second, where
    transformers takes tens of seconds on a busy machine)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tok.encode(text, add_special_tokens=add_special_tokens).ids}


def load_local_tokenizer(info: ModelInfo):
    """A token counter for a local model (``tok(text)["input_ids"]``), or None."""
    if not info.local:
        return None
    fast = Path(info.path) / "tokenizer.json"
    try:
        if fast.is_file():
            return _FastTokenizer(fast)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(info.path)
    except Exception:  # noqa: BLE001
        return None


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"
