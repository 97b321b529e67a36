"""One typed config object for the whole pipeline.

Every section is a dataclass in this package (one module per stage package: engine, ingest,
gen, retrieval, sft, eval; importing them loads nothing heavy); this module composes them,
loads YAML into them (unknown keys are an error, so typos do not pass silently) and applies ``--set section.key=value`` overrides from the CLI. The defaults
are the documented defaults: ``guidealign config show`` prints them all.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from guidealign.config.yamlio import (FLOAT_TEXT, INT_TEXT, ConfigError, dumper,  # noqa: F401 - ConfigError re-exported
                                      yaml_errors, yaml_load)
from guidealign.config.engine import EngineConfig
from guidealign.config.eval import EvalConfig
from guidealign.config.gen import AugmentConfig, DetectConfig, GuidelinesConfig, RespondConfig
from guidealign.config.ingest import IngestConfig
from guidealign.config.retrieval import IndexConfig, LibraryConfig, RetrieveConfig, RetrieverConfig
from guidealign.config.sft import PushConfig, SFTConfig

# Keys with a fixed set of values (see config/gen.py). shards/claims.py:ASSIGNMENTS spells
# ShardAssign's values again (storage is a layer below config and cannot import it);
# tests/test_choice_lists.py checks that the two agree.
ExecutorKind = Literal["local", "ray"]
ShardAssign = Literal["static", "dynamic"]
StageProcess = Literal["auto", "child", "inline"]


@dataclass
class ExecutorConfig:
    # local: run this rank's shards in-process. ray: sharded stages on long-lived Ray worker actors
    # (one engine each, taking shard after shard), other stages as one Ray task.
    kind: ExecutorKind = "local"
    # Resources per Ray worker (actor) or task, e.g. {"num_gpus": 1, "num_cpus": 4}.
    ray_resources: dict = field(default_factory=lambda: {"num_cpus": 1})
    # Per-stage Ray resources, e.g. {detect: {num_gpus: 4}, ingest: {num_cpus: 1}}; a stage
    # not named here uses ray_resources. Empty = every stage uses ray_resources.
    ray_resources_by_stage: dict[str, dict] = field(default_factory=dict)
    # Ray workers (actors, one engine each) per sharded stage; 0 = as many as the cluster's
    # resources hold, at most one per shard.
    ray_workers: int = 0
    # How often Ray restarts a worker (actor) that died, retrying its call (2 = Ray's usual).
    ray_max_restarts: int = 2
    # Ray workers still not started this many seconds after the pool's start or after the last
    # worker that started (no node with room for one: resources held by another job, or a
    # pending autoscaler) are dropped, and the stage runs with the ones that started (an error
    # when none did). Raise it to wait for an autoscaler; 0 = wait without limit.
    ray_start_timeout_s: float = 600.0
    # Which worker takes which shard: "static" (shard i -> rank i mod W: reproducible
    # placement) or "dynamic" (workers claim free shards until none remain, and take over
    # the shards of dead workers; see shards/claims.py).
    assign: ShardAssign = "static"
    # dynamic: a claim whose owner has not heartbeated for this many seconds is taken over
    # (120 s: heartbeats come every 30 s; a dead worker's shard restarts within ~2 min).
    claim_ttl_s: float = 120.0
    # Address of a running Ray cluster ("auto"), or None to start a local one.
    ray_address: str | None = None
    # Reduce stages (library, retriever, index) wait this long for all input shards.
    # 0 = no clock of its own: one rank waits not at all, several wait until the inputs are
    # done, another rank fails, or progress stalls (stall_timeout_s).
    wait_timeout_s: float = 0.0
    # A wait for other ranks ends with an error when for this long no shard was committed
    # and no working rank sent a heartbeat (shards/failure.py). 1800 s: a shard of the
    # paper's recipe commits well within it, while a dead or never-started rank idles the
    # allocation for at most half an hour.
    stall_timeout_s: float = 1800.0
    # Where `run` calls the stages that run torch on a GPU in their own process (library,
    # train-retriever, index, retrieve): "auto" = a child process each where GPUs are visible, so
    # the rank process never holds a CUDA context (GPUs in EXCLUSIVE_PROCESS mode admit one
    # process; in the default mode the context costs vLLM and SFT ~0.5-1 GiB); "child"; "inline".
    stage_process: StageProcess = "auto"


@dataclass
class Config:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    guidelines: GuidelinesConfig = field(default_factory=GuidelinesConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    push: PushConfig = field(default_factory=PushConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    # Input files for `guidealign run` (globs allowed); ingest takes them from the CLI too.
    inputs: list[str] = field(default_factory=list)
    # The fine-tuning prompt set (the paper's ~28k prompts), ingested into WORKDIR/prompts-sft:
    # retrieve and respond then answer these, while `inputs` build the library. Empty = the
    # library's prompts are also answered (one set).
    inputs_sft: list[str] = field(default_factory=list)


_SCALARS = (bool, int, float, str)


def _is(value, tp) -> bool:
    """``isinstance`` where a bool is not an int (YAML's ``true`` is not a count)."""
    if tp is int or tp is float:
        return isinstance(value, tp) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:  # its values ("auto"), not "Literal"
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(tp, value, where: str):
    """Convert a YAML value to the annotated type (dataclasses recursively); a value of
    another type is an error, never passed on (a bool is not an int, a string not a list)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # a key with a fixed set of values: another is refused at load
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            return "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as true/false
        if not any(_is(value, type(a)) and value == a for a in allowed):
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section with every key commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        all_args = typing.get_args(tp)
        args = [a for a in all_args if a is not type(None)]
        if value is None:
            if len(args) < len(all_args):
                return None
            raise ConfigError(f"{where}: expected {' or '.join(map(_type_name, args))}, got None")
        if len(args) == 1:
            return _coerce(args[0], value, where)
        for a in args:  # the member the value already is (bool | str: true, "auto")
            if typing.get_origin(a) is None and a in _SCALARS and _is(value, a):
                return value
        for a in args:  # else a conversion into a member other than text (int | str: 4.0 -> 4)
            if a is str:
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list (YAML [a, b]), got {value!r}")
        (item,) = typing.get_args(tp) or (None,)
        return value if item is None else [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:  # a mapping with every key commented out: empty
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (None, None)
        return value if item is None else {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and _is(value, int):
        return float(value)
    if tp is float and isinstance(value, str) and (INT_TEXT.match(value.strip())
                                                  or FLOAT_TEXT.match(value.strip())):
        # a number quoted ("1e-4", ".inf"), read as the loader reads it unquoted; not "0755",
        # "1_0" or "inf" (refused below)
        return float(yaml_load(value.strip()))
    if tp is int and _is(value, float) and value.is_integer():
        return int(value)
    if tp is str and _is(value, int):
        return str(value)
    if tp in _SCALARS and not _is(value, tp):
        hint = " (quote it to mean the text)" if tp is str else ""
        if tp is float and isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity"):
            hint = " (YAML writes infinity .inf)"
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}{hint}")
    return value


def _did_you_mean(cls, unknown: set, names: set, where: str) -> str:
    """" (did you mean detect.sampling.temperature?)" for the known keys closest to the unknown
    ones (a typo), or, at the top level, the sections that have such a key (``model:`` written
    outside ``engine:``); "" when none is close."""
    import difflib

    hints = []
    for key in sorted((k for k in unknown if isinstance(k, str)), key=str):
        near = difflib.get_close_matches(key, sorted(names), n=2)
        if near:
            hints += [f"{where}.{n}" if where else n for n in near]
        elif cls is Config:  # a section's key at the top level
            hints += [f"{name}.{key}" for name, tp in typing.get_type_hints(Config).items()
                      if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}]
    return f" (did you mean {' or '.join(dict.fromkeys(hints))}?)" if hints else ""


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown, key=str)} in {where or 'config'}"
                          f"{_did_you_mean(cls, unknown, names, where)}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


class Whole(dict):
    """A ``--set KEY={...}`` value for a free-form mapping (a dict-typed key): it replaces the
    mapping, where ``--set KEY.sub=V`` merges into it (``merge`` tells them apart by this type)."""


def _plain(v):
    """``v`` with every ``Whole`` turned back into a dict (what the YAML dumper can write)."""
    return {k: _plain(x) for k, x in v.items()} if isinstance(v, dict) else v


def merge(base: dict, over: dict, schema=Config) -> dict:
    """``over`` on ``base``, key by key into sections (``schema``: the dataclass they are). A
    section given as null (every key commented out) or {} keeps its keys; a free-form mapping
    (``respond.engine``, ``sft.trainer_args``) merges key by key too, but null or {} empties it,
    and a ``Whole`` (an override's mapping value) replaces it."""
    out = dict(base)
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    for k, v in over.items():
        section = dataclasses.is_dataclass(hints.get(k))
        if isinstance(v, Whole):
            out[k] = _plain(v)
        elif isinstance(out.get(k), dict) and (v is None or v == {}):
            out[k] = out[k] if section else {}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, hints.get(k))
        else:
            out[k] = v
    return out


# Free-form mappings whose keys are another section's: ``respond.engine`` holds EngineConfig keys
# (its overrides keep text as ``engine.*``'s do: ``respond.engine.chat_template=no``)
_MAPPING_SCHEMAS = {("respond", "engine"): EngineConfig, ("eval", "judge_engine"): EngineConfig}


def _engine_over(base: EngineConfig, over: dict, where: str) -> EngineConfig:
    """``base`` with the EngineConfig keys of the mapping ``over`` (config key ``where``) over it."""
    return _build(EngineConfig, {**dataclasses.asdict(base), **over}, where)


def responder_engine_config(cfg) -> EngineConfig:
    """The responder's EngineConfig: ``engine`` with ``respond.engine``'s keys over it."""
    return _engine_over(cfg.engine, cfg.respond.engine, "respond.engine") if cfg.respond.engine else cfg.engine


def judge_engine_config(cfg) -> EngineConfig:
    """The eval judge's EngineConfig: the responder's settings with the judge model, the judge's
    chat template (``eval.judge_chat_template``; None = the judge model's own, never the
    responder's) and ``eval.judge_engine``'s keys over them."""
    ec = cfg.eval
    named = sorted(set(ec.judge_engine) & {"model", "chat_template"})
    if named:
        raise ConfigError(f"eval.judge_engine.{named[0]}: set eval.judge_{named[0]} instead")
    return _engine_over(responder_engine_config(cfg), {"model": ec.judge_model,
                        "chat_template": ec.judge_chat_template, **ec.judge_engine}, "eval.judge_engine")


def _leaf_type(schema, parts: list[str]):
    """The annotated type of the dotted key ``parts`` in dataclass ``schema``; None when the
    key is unknown or leads into a free-form mapping (its values stay YAML)."""
    tp = schema
    for i, p in enumerate(parts):
        tp = _MAPPING_SCHEMAS.get(tuple(parts[:i]), tp) if schema is Config else tp
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if p not in hints:
            return None
        tp = hints[p]
    return tp


def _free_mapping(schema, parts: list[str]) -> bool:
    """Whether the dotted key ``parts`` is a free-form mapping: a dict-typed field
    (``respond.engine``, ``sft.trainer_args``, ``executor.ray_resources``) or a value of one whose
    values are mappings (``executor.ray_resources_by_stage.detect``)."""
    tp = _leaf_type(schema, parts)
    if tp is None and len(parts) > 1:
        parent = _leaf_type(schema, parts[:-1])
        if typing.get_origin(parent) is dict:
            tp = typing.get_args(parent)[1]
    return tp is dict or typing.get_origin(tp) is dict


def _wants_text(tp) -> bool:
    """A ``str`` or ``str | None`` field, or one of fixed text values (not a union with
    bool/int: there YAML decides)."""
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)] == [str]
    return False


_NULLS = ("null", "Null", "NULL", "~")


def _override_value(raw: str, tp, item: str):
    """An override's value: YAML, but a text field takes the text as written (YAML would read
    ``|`` as "", ``a #b`` as "a", ``1.10`` as 1.1, ``no`` as False, ``0123`` as 83); quoted text
    is unquoted, and ``null`` in an optional text field is None."""
    text = raw.strip()
    if _wants_text(tp):
        if text in _NULLS:
            if tp is not str:
                return None
            # a key that cannot be unset: `push.repo_id=null` was the repo "null"
            raise ConfigError(f"override {item!r}: this key is text and cannot be null; give "
                              "the text ('' for none), or quote it to mean the word")
        if text[:1] in ("'", '"'):
            try:
                value = yaml_load(text)
            except yaml_errors():
                value = None
            if isinstance(value, str):
                return value
        return text
    if text == "":  # "--set KEY=" or "--set KEY= ": no value (refused by a non-text key)
        return ""
    try:
        return yaml_load(raw)
    except yaml_errors() as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML "
                          f"({str(e).splitlines()[0]}); quote it") from None
    except ConfigError as e:  # a key given twice, or one that is not text: say in which --set
        raise ConfigError(f"override {item!r}: {e}") from None


def parse_overrides(items: typing.Iterable[str], schema=None) -> dict:
    """``["detect.sampling.temperature=0", "engine.model=/m"]`` -> nested dict (values parsed as
    YAML, but a text field of ``schema`` (default: ``Config``) keeps the text as written). A
    mapping given to a free-form mapping key is a ``Whole``: it replaces that mapping."""
    schema = Config if schema is None else schema
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in key {key.strip()!r}")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} was set to a "
                                  "value by an earlier --set, it has no keys")
        value = _override_value(raw, _leaf_type(schema, parts), item)
        if isinstance(value, dict) and _free_mapping(schema, parts):
            # `--set respond.engine={model: X}` is the whole mapping, not keys to lay over the
            # file's: the file's chat_template and max_model_len must not stay
            value = Whole(value)
        node[parts[-1]] = _over_earlier(node.get(parts[-1]), value)
    return out


def _over_earlier(earlier, value):
    """``value`` (an override) over what earlier overrides set at its key: a mapping merges into
    an earlier mapping key by key, recursively (``--set engine.model=M --set 'engine={dtype:
    float32}'`` keeps the model), the later value winning each key it names; anything else
    replaces. The result is a ``Whole`` when either is one; an empty ``Whole`` ({} or null given
    to a free-form mapping) still empties it, and a whole free-form mapping given after another
    replaces it (``--set 'respond.engine={...}'`` twice: the last one, as written)."""
    if not (isinstance(earlier, dict) and isinstance(value, dict)) or (isinstance(value, Whole) and not value) \
            or (isinstance(earlier, Whole) and isinstance(value, Whole)):
        return value
    out = dict(earlier)
    for k, v in value.items():
        out[k] = _over_earlier(earlier.get(k), v)
    return Whole(out) if isinstance(earlier, Whole) or isinstance(value, Whole) else out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                extra: dict | None = None) -> Config:
    """Defaults, then the YAML file, then ``extra`` (from CLI options), then ``--set`` overrides."""
    data: dict = {}
    if path:
        text = Path(path).read_text()
        try:
            data = yaml_load(text) or {}
        except ConfigError as e:  # a key given twice: say in which file (syntax errors name it too)
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = merge(to_dict(Config()), data)
    if extra:
        data = merge(data, extra)
    data = merge(data, parse_overrides(overrides))
    cfg = _build(Config, data)
    # the responder's and the judge's engine keys: checked now, not when respond or eval starts
    responder = responder_engine_config(cfg) if cfg.respond.engine else None
    if cfg.inputs and cfg.ingest.inputs and cfg.inputs != cfg.ingest.inputs:
        raise ConfigError(f"inputs {cfg.inputs} and ingest.inputs {cfg.ingest.inputs} differ, and "
                          "ingest would read only the first: set one of them")
    judge = judge_engine_config(cfg) if cfg.eval.judge_engine else None
    from guidealign.config.bounds import out_of_bounds

    bad = out_of_bounds(cfg, responder, judge)
    if bad:
        raise ConfigError("; ".join(bad))
    check_guided_system(cfg.respond)
    return cfg


def config_error(e: Exception) -> str:
    """One line for a config that does not load: a YAML syntax error says where (its message
    spans several lines, with the offending line and a caret), text that is not UTF-8 says so."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        return (f"the file is not valid YAML: {e.problem or e.context or 'syntax error'} "
                f"(line {m.line + 1}, column {m.column + 1})")
    if isinstance(e, UnicodeDecodeError):
        return f"the file is not UTF-8 text ({e.reason} at byte {e.start})"
    return str(e)


def check_guided_system(rcfg) -> None:
    """A guided prompt shows its guidelines where ``respond.guided_system`` says "{guidelines}";
    one without the placeholder would answer every prompt unguided (while its row lists them)."""
    if "{guidelines}" not in rcfg.guided_system:
        raise ConfigError("respond.guided_system: no {guidelines} placeholder, so no guided prompt would "
                          "show its guidelines; put {guidelines} where they go")


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.dump(to_dict(cfg), Dumper=dumper(), sort_keys=False)


def wait_timeout(cfg: Config, world_size: int) -> float:
    """The one rule for how long a stage waits for inputs that other ranks write:
    ``executor.wait_timeout_s`` when set; else no wait for a single worker (its inputs are
    complete or missing), and no clock of its own for several (the wait still ends when a
    rank fails or progress stalls for ``executor.stall_timeout_s``, shards/failure.py)."""
    t = float(cfg.executor.wait_timeout_s or 0.0)
    return t if t > 0 else (0.0 if world_size == 1 else float("inf"))


def prompt_set(cfg: Config, configured: str = "") -> str:
    """The prompt dataset a stage reads: ``configured`` when set, else the fine-tuning set
    ("prompts-sft", ingested from ``inputs_sft``) when the config has one, else "prompts"
    (the paper's layout: the library from one set, responses for another)."""
    if configured:
        return configured
    return "prompts-sft" if getattr(cfg, "inputs_sft", None) else "prompts"
