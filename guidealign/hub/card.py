"""Model and dataset cards (README.md with YAML metadata) carrying provenance."""
from __future__ import annotations

import json
from pathlib import Path

PAPER = "https://arxiv.org/abs/2403.11838"


# License identifiers the Hub accepts in a card's `license:` (lower case, as the Hub lists them,
# https://huggingface.co/docs/hub/repositories-licenses); the common ones, to recognize
# "Apache 2.0", "MIT" or "CC-BY-4.0" as written by a person.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1
ncsa unlicense zlib pddl lgpl-lr llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
""".split())


def license_meta(value: str) -> dict:
    """The card metadata for push.license. The Hub refuses a card (and with it the commit that
    carries it) whose `license` is not one of its identifiers: a known license however it is
    written ("Apache 2.0", "MIT", "llama-2", "gpl-3") becomes its identifier; anything else,
    in any case ("proprietary", "custom"), is `license: other` with the text as `license_name`
    (a lower-case slug, as the Hub asks of it)."""
    import re

    text = (value or "").strip()
    if not text:
        return {}
    ident = re.sub(r"[\s_]+", "-", text.lower())
    base = ident.removesuffix("-license")
    # "llama-2" is llama2, "gpl-3" and "cc-by-4" are gpl-3.0 and cc-by-4.0
    for cand in (ident, base, re.sub(r"-(?=\d)", "", base), base + ".0"):
        if cand in HUB_LICENSES:
            return {"license": cand}
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "custom"
    return {"license": "other", "license_name": slug}


def _front(meta: dict) -> str:
    import yaml  # (here, not at the top: every stage records its config with ``without_secrets``)

    meta = {k: v for k, v in meta.items() if v not in (None, "", [], {})}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _yaml_block(obj) -> str:
    import yaml

    return "```yaml\n" + yaml.safe_dump(obj, sort_keys=False) + "```\n"


def _hub_id(name: str) -> bool:
    """``name`` is a Hub model id (``gpt2``, ``org/name``), not a local path or malformed, by
    :func:`guidealign.core.models.model_ref` (the Hub refuses a card whose ``base_model`` is not
    a model id, and with it the commit that carries it)."""
    from guidealign.core.models import is_hub_id

    return bool(name) and is_hub_id(name)


def _local_path(s: str) -> bool:
    """``s`` names a local file or directory: ``/…``, ``./…``, ``~…``, or ``a/b`` that is no
    Hub id and is there on this machine; ``embedded:`` names, URLs and other text (a stop
    string such as ``</s>``, a template) are none."""
    from guidealign.core.models import _PATH_PREFIXES

    if s.startswith("embedded:") or "://" in s or "\n" in s or not s.strip("/"):
        return False
    try:
        if any(c.isspace() for c in s):  # text, unless a path (with a space) that is there
            return s.startswith(_PATH_PREFIXES) and Path(s).expanduser().exists()
        if s.startswith(("./", "../", "~/")) or (s.startswith("/") and "/" in s[1:].rstrip("/")):
            return True  # "/>" or "/" alone is a stop string, not a path
        return "/" in s and not _hub_id(s) and Path(s).exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL
        return False


# Words of a key name (split at "_", "-", ".", spaces and camelCase) that make its value a
# secret: a free-form mapping (sft.trainer_args) takes any key the library it feeds accepts,
# e.g. hub_token, api_key, use_auth_token, password. "key" and "token" alone are no secret:
# sort_key, pad_token and eos_token name tokenizer settings (``_secret_key``).
SECRET_WORDS = frozenset("""
secret secrets password passwd passphrase credential credentials apikey auth authorization
cookie cookies bearer
""".split())
KEY_PREFIXES = frozenset("api access private secret ssh hf hub client openai".split())
# words before a final "token" that make it a tokenizer or length setting, not a credential
TOKEN_SETTINGS = frozenset("pad eos bos unk sep cls mask start end additional special max min "
                           "num per".split())
REDACTED = "(redacted)"


def _key_words(name: str) -> list[str]:
    """The lower-case words of a key name: ``hubToken`` and ``hub-token`` are hub, token."""
    import re

    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _secret_key(name) -> bool:
    """Whether a key's value may be a secret (a token, password, API key): by its name's words
    (``SECRET_WORDS``); "key" after api/access/private/hub... (``api_key``, ``access_key``);
    "token" as the last word (``token``, ``hub_token``) unless it names a tokenizer's special
    token or a length (``pad_token``, ``max_token``; ``pad_token_id``, ``max_tokens`` are none)."""
    if not isinstance(name, str):
        return False
    words = _key_words(name)
    if not words:
        return False
    pairs = list(zip([""] + words, words))
    if any(w in SECRET_WORDS or (w == "key" and before in KEY_PREFIXES) for before, w in pairs):
        return True
    before, last = pairs[-1]
    return last == "token" and before not in TOKEN_SETTINGS


_HUB_TOKEN = r"hf_[A-Za-z0-9]{30,}"


def _secret_text(s: str) -> bool:
    """A Hugging Face access token (``hf_`` and 30 or more letters and digits) in a value, alone
    or inside it (``--hub_token=hf_...``, ``Bearer hf_...``, a URL), whatever key holds it."""
    import re

    return re.search(_HUB_TOKEN, s) is not None


def _without_token(s: str) -> str:
    """A string with any Hub token in it redacted."""
    import re

    return re.sub(_HUB_TOKEN, REDACTED, s) if _secret_text(s) else s


def _cache_repo_id(s: str) -> str | None:
    """The Hub model id of a snapshot folder of the Hugging Face cache (``core.models``), or None."""
    from guidealign.core.models import cache_snapshot_ref

    return cache_snapshot_ref(s)[0]


def _redact_text(s: str) -> str:
    """A string as a card may show it: Hub tokens in it redacted, a local path by its base name
    (a snapshot of the Hugging Face cache by its model's Hub id: its base name is a commit hash)."""
    if _secret_text(s):
        return _without_token(s)
    if _local_path(s):
        return _cache_repo_id(s) or Path(s.rstrip("/")).name or "(local path)"
    return s


def _redact_keys(keys: list) -> list:
    """A mapping's keys as a card may show them (``_redact_text``: SFT keys the datasets it read
    outside the run by their path), still unique: a key that names the same as another gets
    ``#2``, ``#3``... (``respond``, ``respond#2``). Keys left as they are keep their names."""
    new = [_redact_text(k) if isinstance(k, str) else k for k in keys]
    taken = {k for k, n in zip(keys, new) if k == n}
    out = []
    for k, n in zip(keys, new):
        if k != n:
            base, i = n, 2
            while n in taken:
                n, i = f"{base}#{i}", i + 1
            taken.add(n)
        out.append(n)
    return out


def without_secrets(obj):
    """``obj`` (a config as a dict) with only its secrets out: the value of a key that names one
    (``_secret_key``) and text shaped like a Hub token become "(redacted)"; paths stay (the run's
    own record of its config, ``shards.config_record``; ``redact`` shortens them for a card)."""
    return _scrub(obj, for_card=False)


def redact(obj):
    """``obj`` (a config dict, model names, a card's fields) as a card may publish it: secrets out
    as ``without_secrets`` takes them out; besides, Hub ids and ``embedded:`` names stay, a local
    path becomes its base name (no home directories, user names or cluster layout) and the
    ``executor`` section (Ray address) is left out. Keys follow the same rules as values
    (``_redact_keys``), so a dataset SFT read outside the run, which its ``_done.json`` keys by
    its path, is named by its base name."""
    return _scrub(obj, for_card=True)


def _scrub(obj, for_card: bool):
    """The one walk of ``without_secrets`` and ``redact``: at any depth, the value of a key that
    names a secret becomes "(redacted)", and so does a Hub token in any string value; ``for_card``
    adds what a published card leaves out (``redact``; it rewrites keys too, a token in one
    included)."""
    if isinstance(obj, dict):
        items = [(k, REDACTED if _secret_key(k) else _scrub(v, for_card)) for k, v in obj.items()
                 if not (for_card and k == "executor")]
        keys = [k for k, _ in items]
        return dict(zip(_redact_keys(keys) if for_card else keys, (v for _, v in items)))
    if isinstance(obj, (list, tuple)):
        return [_scrub(v, for_card) for v in obj]
    if isinstance(obj, str):
        return _redact_text(obj) if for_card else _without_token(obj)
    return obj


def model_card(*, base_model: str, data: dict, hyperparameters: dict, metrics: dict,
               mode: str, merged: bool) -> str:
    """The trained model's card: base model, training data, hyperparameters, loss figures.
    An unmerged LoRA adapter is a PEFT repo (library_name: peft), as peft's own cards say."""
    # a base model given as a snapshot folder of the Hub cache, or an embedded one, is that Hub model
    from guidealign.core.models import hub_ref

    hub_base = hub_ref(base_model)[0]
    base_model, data, hyperparameters, metrics = redact([base_model, data, hyperparameters,
                                                         metrics])
    adapter = mode == "lora" and not merged
    meta = {"library_name": "peft" if adapter else "transformers", "base_model": hub_base,
            "tags": ["guide-align", "sft", "trl"] + (["lora"] if mode == "lora" else []),
            "pipeline_tag": "text-generation"}
    kind = "full fine-tuning" if mode == "full" else \
        ("LoRA, adapter merged into the weights" if merged else "LoRA adapter")
    return (_front(meta)
            + "\n# Labrador (Guide-Align SFT)\n\n"
            f"Supervised fine-tuning ({kind}) of `{base_model}` on responses generated under "
            f"retrieved safety/quality guidelines, following Guide-Align ({PAPER}). The training "
            "conversations hold the user prompt and the guided response only: the guidelines are "
            "not in the prompt, so the model answers well without them. Loss is on the assistant "
            "turn only.\n\n"
            f"## Base model\n\n`{base_model}`\n\n"
            "## Training data\n\n" + _yaml_block(data)
            + "\n## Hyperparameters\n\n" + _yaml_block(hyperparameters)
            + "\n## Training results\n\n" + _yaml_block(metrics))


def stage_provenance(workdir) -> dict:
    """Counts and metrics of every stage in a run directory (from manifests and _done.json)."""
    from guidealign.shards import read_manifest, read_marker
    from guidealign.shards.layout import shard_indices
    from guidealign.shards.manifest import damaged_shards, stale_shards

    out = {}
    wd = Path(workdir)
    if not wd.is_dir():
        return out
    for d in sorted(p for p in wd.iterdir() if p.is_dir()):
        man = read_manifest(d)
        info: dict = {}
        if man is not None:
            # the shards status counts: not those of an earlier config or input (stale), nor
            # markers beyond the manifest's shard count
            stale = stale_shards(d, man)
            damaged = damaged_shards(d, man, among=stale)  # as status says: a file cut short, not stale
            markers = [m for m in (read_marker(d, i) for i in shard_indices(d)
                                   if i < man["num_shards"] and i not in stale) if m is not None]
            info = {"shards": len(markers), "shards_total": man.get("num_shards"),
                    "shards_stale": len(stale - damaged), "shards_damaged": len(damaged),
                    "rows": sum(m.rows for m in markers),
                    "quarantined": sum(m.quarantined for m in markers)}
            for k in ("model", "fingerprint"):
                if k in man:
                    info[k] = man[k]
            stats: dict = {}
            for m in markers:
                for k, v in (m.stats or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        stats[k] = stats.get(k, 0) + v
            if stats:
                info["stats"] = stats
        done = d / "_done.json"
        if done.exists():
            try:
                record = json.loads(done.read_text())
            except (OSError, ValueError):  # damaged (bad JSON, not UTF-8): no record
                record = None
            if isinstance(record, dict):
                info["done"] = record
        if info:
            out[d.name] = info
    return out


def run_models(prov: dict, cfg) -> dict:
    """The models of a run: those its stages recorded (a generation stage's manifest, the
    retriever's and SFT's ``_done.json``), else ``cfg``'s, which are then listed under
    ``from_config`` (a stage not run, or written before stages recorded their model)."""
    def rec(stage: str, key: str = "model"):
        info = prov.get(stage, {})
        return info.get(key) or (info.get("done") or {}).get(key)

    models = {"generator": rec("guidelines") or rec("detect"),
              "responder": rec("respond"),
              "retriever_base": rec("retriever", "base_model"),
              "sft_base": rec("sft", "base_model")}
    configured = {"generator": cfg.engine.model,
                  "responder": (cfg.respond.engine or {}).get("model") or cfg.engine.model,
                  "retriever_base": cfg.retriever.base_model,
                  "sft_base": cfg.sft.base_model}
    from_config = [k for k, v in models.items() if not v]
    models = {k: v or configured[k] for k, v in models.items()}
    if from_config:
        models["from_config"] = from_config
    return models


def prompt_versions() -> dict:
    """The generation prompts' version: a hash of each prompt file in gen/prompts (and of all)."""
    import hashlib

    d = Path(__file__).resolve().parents[1] / "gen" / "prompts"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12]
             for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}
    if not files:
        return {}
    total = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    return {"version": total, "files": files}


def dataset_card(*, repo_id: str, stage: str, rows: int, files: int, cfg, workdir,
                 data_dir: str = "data") -> str:
    """A dataset card with provenance: models, prompt version, config, counts, library size,
    retriever metrics, and a `configs` entry so that `datasets.load_dataset` finds the shards."""
    from guidealign.config import to_dict

    prov = redact(stage_provenance(workdir))  # no local paths (the input a stage read, ...)
    lib = prov.get("library", {})
    retr = prov.get("retriever", {}).get("done", {})
    meta = {"pretty_name": cfg.push.pretty_name or None, **license_meta(cfg.push.license),
            "tags": ["guide-align", "synthetic", stage],
            "configs": [{"config_name": "default",
                         "data_files": [{"split": "train", "path": f"{data_dir}/*.parquet"}]}]}
    models = redact(run_models(prov, cfg))
    prompts = prompt_versions()
    summary = {"stage": stage, "rows": rows, "parquet_files": files,
               "library_size": lib.get("rows"),
               "library_version": (lib.get("done") or {}).get("version"),
               "retriever_metrics": retr.get("metrics") or {k: v for k, v in retr.items()
                                                            if k not in ("fingerprint",)} or None,
               "prompt_version": prompts.get("version"),
               "prompt_files": prompts.get("files")}
    return (_front(meta)
            + f"\n# {repo_id}\n\n"
            f"The `{stage}` stage of a Guide-Align run ({PAPER}), generated by guide-align. "
            f"{rows} rows in {files} Parquet file(s) under `{data_dir}/`, pushed as written.\n\n"
            "## Provenance\n\n" + _yaml_block(summary)
            + "\n### Models\n\n" + _yaml_block(models)
            + "\n### Stages of the run\n\n" + _yaml_block(prov)
            + "\n### Config\n\n" + _config_section(stage, cfg, workdir))


def _config_section(stage: str, cfg, workdir) -> str:
    """The config the published stage last ran with (``shards.config_record``), else the one
    given to push, said so: it may not be the run's (the defaults, without the run's ``-c``)."""
    from guidealign.config import to_dict
    from guidealign.shards import read_manifest
    from guidealign.shards.config_record import read_stage_config

    # the stage that wrote the dataset: its manifest's stage; ingest names the dataset there
    # (prompts, prompts-sft, --into), and its manifest lists the input files and their encodings
    man = read_manifest(Path(workdir) / stage) or {}
    made_by = "ingest" if {"files", "encodings"} <= set(man) else man.get("stage") or stage
    recorded = read_stage_config(workdir, made_by)
    if recorded is not None:
        return _yaml_block(redact(recorded)) + f"\nThe config the `{made_by}` stage last ran with.\n"
    return (_yaml_block(redact(to_dict(cfg))) + f"\nNo record of the config `{made_by}` ran with "
            "was found beside this dataset (its run kept none, or the dataset was pushed from "
            "outside its run directory): this is the config given to `push`, which may differ "
            "from the run's.\n")
