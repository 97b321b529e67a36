"""``guidealign check -c CONFIG``: a preflight that loads no weights, run before GPU hours.

One row per check (OK / WARN / FAIL / INFO), printed as one table; any FAIL gives a non-zero
exit. Checked: every model of every role resolves (local path, embedded, local Hub cache, or
"would download" with its size when online); every chat model's tokenizer has a chat template
or one is configured; ``max_model_len`` fits the longest prompt the stages build (counted with
the tokenizer when it is local, else about 4 characters a token) and the model's context;
``tensor_parallel_size`` fits the visible GPUs; SFT's batch arithmetic adds up; GPU memory per
engine and for SFT (parameters x bytes, + gradients and Adam state for full fine-tuning);
disk for the run directory; the Hub token when push is configured (never printed), and a
repo id when push runs; executor settings (Ray's resources are numbers); what SFT's trainer
would refuse at its start (a LoRA merge under FSDP/DeepSpeed, the scheduler's name, the keys of
``sft.trainer_args``); the eval section as eval checks it (its preset, judges, templates). A
check that raises (a prompt file that is not there, too many exemplars) is a FAIL row naming
its key, never a traceback. ``guidealign run`` runs it first (``--no-check`` skips it).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from guidealign.check_jobs import (FAIL, INFO, OK, WARN, Row, disk_row,  # noqa: F401 - re-exported
                                   other_rows, ray_resource_rows, sft_rows)
from guidealign.check_models import ModelInfo, gib, load_local_tokenizer, locate

GUIDELINE_TOKENS = 80  # our estimate of one library guideline's length in tokens
USER_TOKENS = 512      # room assumed for a user prompt when sizing the respond prompt


@dataclass
class Role:
    name: str          # "guideline writer", "responder", ...
    model: str
    template_key: str | None  # config key of its chat template; None: no chat (encoder, classifier)
    template: str | None = None
    engine: object = None     # its EngineConfig when it runs in vLLM
    stages: tuple[str, ...] = ()  # the stages that load it (`run`'s preflight checks those it runs)


def guarded(check: str, item: str, key: str, fn) -> list[Row]:
    """``fn()``'s rows, or one FAIL row naming ``key`` when it raises: a prompt file that is not
    there or a value a stage refuses is a row of the table (and `run`'s preflight failure), not
    a traceback that hides the other rows."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - whatever the check raises, the stage would too
        why = str(e)
        if not key:
            why = f"{type(e).__name__}: {why}"
        elif not why.startswith(key):  # a message that names its key already stays as it is
            why = f"{key}: {why}"
        return [Row(check, item, FAIL, why)]


def roles(cfg) -> list[Role]:
    from guidealign.gen.respond import respond_engine

    own = bool(cfg.respond.engine)  # the responder has an engine of its own
    out = [Role("guideline writer", cfg.engine.model, "engine.chat_template", cfg.engine.chat_template,
                cfg.engine, ("detect", "guidelines", "augment") + (() if own else ("respond",)))]
    if own:
        e = respond_engine(cfg)
        out.append(Role("responder", e.model, "respond.engine.chat_template", e.chat_template, e, ("respond",)))
    out.append(Role("SFT base", cfg.sft.base_model, "sft.chat_template", cfg.sft.chat_template,
                    stages=("sft",)))
    if "pairwise" in (cfg.eval.judges or ["pairwise"]) or cfg.eval.harm_judge == "llm":
        out.append(Role("eval judge", cfg.eval.judge_model, "eval.judge_chat_template",
                        *_judge_template_and_engine(cfg), ("eval",)))
    if cfg.eval.harm_judge == "classifier":
        out.append(Role("eval classifier", cfg.eval.classifier_model, None, stages=("eval",)))
    out.append(Role("retriever base", cfg.retriever.base_model, None, stages=("train-retriever",)))
    if cfg.index.model != "retriever":  # another encoder than the trained retriever
        out.append(Role("index encoder", cfg.index.model, None, stages=("index", "retrieve")))
    if cfg.library.candidates == "model":
        out.append(Role("library candidates", cfg.library.embed_model, None, stages=("library",)))
    return out


def _judge_template_and_engine(cfg):
    """(chat template, EngineConfig) the eval judge runs with, as eval builds it
    (eval/generate.py): the responder's engine settings with the judge model and
    ``eval.judge_chat_template``; when the judge is the responder's model and no judge template
    is set, the responder's own engine (and chat template) judges."""
    from guidealign.eval.generate import judge_engine, judge_is_responder, responder_engine

    r, j = responder_engine(cfg), judge_engine(cfg)
    if judge_is_responder(cfg):
        j = dataclasses.replace(r, model=cfg.eval.judge_model)
    return j.chat_template, j


def _judge_prompt_rows(cfg, tok, max_len: int) -> list[Row]:
    """The longest judge prompt: the judge's system message and wording (built-in or
    configured, counted), a question of up to USER_TOKENS and each answer cut to
    ``max_response_tokens`` (each with the cut mark)."""
    from guidealign.eval.prompts import CUT_MARK, HARM_TEMPLATE, JUDGE_SYSTEM, PAIRWISE_TEMPLATE, fill

    ec = cfg.eval
    system = ec.judge_system or JUDGE_SYSTEM
    kinds = []  # (the wording without its fields, answers in it)
    if "pairwise" in (ec.judges or ["pairwise"]):
        kinds.append((fill(ec.pairwise_template or PAIRWISE_TEMPLATE, question="", answer_a="",
                           answer_b=""), 2))
    if ec.harm_judge == "llm":
        kinds.append((fill(ec.harm_template or HARM_TEMPLATE, question="", answer=""), 1))
    cut, _ = _tokens(tok, CUT_MARK)
    per_answer = ec.max_response_tokens + cut
    question = min(ec.max_response_tokens, USER_TOKENS) + cut
    text, n = max(((system + "\n" + w, n) for w, n in kinds),
                  key=lambda k: _tokens(tok, k[0])[0] + k[1] * per_answer)
    return [_fit_row("eval judge", tok, text, text, question + n * per_answer,
                     ec.judge_sampling.max_tokens, max_len, "long answers will be cut further")]


def _tokens(tok, text: str) -> tuple[int, bool]:
    """(tokens, exact): counted with the tokenizer, else ~4 characters a token."""
    if tok is not None:
        return len(tok(text, add_special_tokens=False)["input_ids"]), True
    return len(text) // 4 + 1, False


def _prompt_text(path: str | None, default: str) -> tuple[str, str]:
    """(whole file text, system + user text) of a prompt YAML."""
    import yaml

    from guidealign.gen.build import builtin_prompt_path

    p = Path(path) if path else builtin_prompt_path(default)
    raw = p.read_text()
    data = yaml.safe_load(raw) or {}
    fixed = "\n".join(str(data.get(k, "")) for k in ("system", "user", "user_template"))
    return raw, fixed


def _fit_row(stage: str, tok, whole: str, fixed: str, extra: int, max_tokens: int,
             max_len: int, overflow: str) -> Row:
    n_all, exact = _tokens(tok, whole)
    n_fixed, _ = _tokens(tok, fixed)
    total, least = n_all + extra + max_tokens, n_fixed + extra + max_tokens
    how = "" if exact else " (estimated at 4 chars/token: tokenizer not local)"
    detail = (f"longest prompt ~{n_all + extra} + max_tokens {max_tokens} = {total} "
              f"vs max_model_len {max_len}{how}")
    if total <= max_len:
        return Row("max_model_len", stage, OK, detail)
    if least <= max_len:
        return Row("max_model_len", stage, WARN, f"{detail}: {overflow}")
    return Row("max_model_len", stage, FAIL, f"{detail}: does not fit even without exemplars")


def context_rows(role: Role, info: ModelInfo) -> list[Row]:
    """max_model_len against the model's context (needs no chat template)."""
    e = role.engine
    if info.max_positions and e.max_model_len > info.max_positions:
        return [Row("max_model_len", role.name, FAIL,
                    f"max_model_len {e.max_model_len} > the model's context {info.max_positions}")]
    return []


def length_rows(cfg, role: Role, tok, info: ModelInfo) -> list[Row]:
    from guidealign.gen.respond import format_guidelines, load_exemplars

    e = role.engine
    rows = context_rows(role, info)
    dropped = "some exemplars will be dropped (a warning says so)"

    def prompt_fit(stage, path, default, reserve, max_tokens):
        w, f = _prompt_text(path, default)
        return [_fit_row(stage, tok, w, f, reserve, max_tokens, e.max_model_len, dropped)]

    if role.name == "guideline writer":
        d = cfg.detect
        rows += guarded("prompt file", "detect", "detect.prompt_file", lambda: prompt_fit(
            "detect", d.prompt_file, "detect.yaml", d.reserve_input_tokens, d.sampling.max_tokens))
        g = cfg.guidelines
        for kind, path, name in (("safety", g.safety_prompt_file, "safety_guidelines.yaml"),
                                 ("quality", g.quality_prompt_file, "quality_guidelines.yaml")):
            rows += guarded("prompt file", f"guidelines ({kind})", f"guidelines.{kind}_prompt_file",
                            lambda path=path, name=name, kind=kind: prompt_fit(
                                f"guidelines ({kind})", path, name, g.reserve_input_tokens,
                                g.sampling.max_tokens))
    if role.name in ("responder",) or (role.name == "guideline writer" and not cfg.respond.engine):
        rc = cfg.respond

        def loads(rcfg) -> list[Row]:
            load_exemplars(rcfg)
            return []

        # the file first (read and checked with no exemplar taken), then the count it must hold,
        # so that the row names the key to fix
        bad = guarded("prompt file", "respond", "respond.exemplars_file",
                      lambda: loads(dataclasses.replace(rc, num_exemplars=0)))
        bad = bad or guarded("prompt file", "respond", "respond.num_exemplars", lambda: loads(rc))
        if bad:
            rows += bad
        else:
            k = min(rc.max_guidelines or cfg.retrieve.keep, cfg.retrieve.keep)  # a row holds at most keep
            system = rc.guided_system.replace("{guidelines}", format_guidelines(["x" * 4 * GUIDELINE_TOKENS] * k))
            exs = "\n".join(q + "\n" + a for q, a in load_exemplars(rc)[0])
            rows.append(_fit_row("respond", tok, system + "\n" + exs, "", USER_TOKENS + 16,
                                 rc.sampling.max_tokens, e.max_model_len,
                                 "long prompts will be truncated (the start of the user text; guidelines only below respond.min_user_tokens)"))
    if role.name == "eval judge":
        rows += guarded("prompt file", "eval judge", "eval.judge_system/pairwise_template/harm_template",
                        lambda: _judge_prompt_rows(cfg, tok, e.max_model_len))
    return rows


def model_rows(cfg, role: Role, info: ModelInfo) -> list[Row]:
    from guidealign.gen.templates import ChatTemplateError, resolve_template

    where = {"local": f"local: {info.path}", "embedded": f"embedded: {info.path}",
             "hub cache": f"in the local Hub cache: {info.path}"}.get(info.where, "")
    status = OK if info.local else (FAIL if info.where == "missing" else WARN)
    size = f"; {info.params / 1e9:.2f}B params ({info.params_source})" if info.params else ""
    rows = [Row("model", f"{role.name}: {role.model}", status,
                (where or "; ".join(info.notes)) + size)]
    if role.template_key is None:
        return rows
    item = f"{role.name} chat template"
    if role.template:
        try:
            resolve_template(role.template)
            rows.append(Row("chat template", item, OK, f"{role.template_key} = {role.template}"))
        except ChatTemplateError as e:
            rows.append(Row("chat template", item, FAIL, str(e)))
    elif info.template:
        rows.append(Row("chat template", item, OK, "the tokenizer's own"))
    elif info.template is False:
        rows.append(Row("chat template", item, FAIL,
                        f"{role.model} has no chat template and none is configured: set "
                        f"{role.template_key} (vicuna_v1.1, llama-2, chatml or a .jinja file)"))
    else:
        rows.append(Row("chat template", item, WARN,
                        "cannot tell until the model is downloaded; set "
                        f"{role.template_key} to be sure"))
    return rows


def gpu_rows(cfg, engines: list[tuple[Role, ModelInfo]], sft: ModelInfo | None, gpus: list[str],
             gpu_mem: int | None) -> list[Row]:
    """The engines' GPUs and memory; SFT's batch and memory unless ``sft`` is None (not run)."""
    from guidealign.core.gpu import devices_per_process, is_mig
    from guidealign.sft.launcher import node_gpus, resolve_num_processes
    from guidealign.sft.precision import sharded_training
    from guidealign.sft.train import accumulation_steps

    rows = []
    on_mig = any(is_mig(g) for g in gpus)
    for role, info in engines:
        e = role.engine
        tp = e.tensor_parallel_size
        if not gpus:
            rows.append(Row("GPUs", f"{role.name} tensor_parallel_size", INFO,
                            f"{tp}; no GPU visible here (the CPU engine ignores it): run nodes need "
                            f"{tp} GPU(s) per engine"))
        elif tp > 1 and devices_per_process(gpus) == 1 and len(gpus) > 1:  # MIG devices
            rows.append(Row("GPUs", f"{role.name} tensor_parallel_size", FAIL,
                            f"{tp} over MIG devices: a process can use one MIG device, so an engine "
                            "on them needs tensor_parallel_size 1 (launch starts one per device)"))
        elif tp > len(gpus):
            rows.append(Row("GPUs", f"{role.name} tensor_parallel_size", FAIL,
                            f"{tp} > {len(gpus)} visible GPU(s)"))
        else:
            idle = len(gpus) % tp
            rows.append(Row("GPUs", f"{role.name} tensor_parallel_size", WARN if idle else OK,
                            f"{tp}: {len(gpus) // tp} engine(s) on {len(gpus)} GPU(s)"
                            + (f", {idle} idle" if idle else "")))
        if on_mig:
            rows.append(Row("GPUs", f"{role.name} on MIG devices", WARN,
                            "vLLM 0.32 turns a MIG device's UUID into an NVML index and reads it as a "
                            "whole GPU's (platforms/cuda.py); engines on MIG devices are reported to "
                            "fail at start upstream (vllm-project/vllm issues 41848, 6551). Start one "
                            "engine on a MIG device by hand before a long run, or use whole GPUs"))
        if info.heads and info.heads % tp:  # vLLM splits the heads evenly over the engine's GPUs
            judge = role.name == "eval judge"  # `run` never starts it
            rows.append(Row("GPUs", f"{role.name} attention heads", FAIL if gpus and not judge else WARN,
                            f"{role.model} has {info.heads} attention heads, which "
                            f"tensor_parallel_size {tp} does not divide: vLLM on GPUs refuses to start "
                            + ("eval's judge engine (`guidealign run` does not use it; give the judge its "
                               "own with eval.judge_engine.tensor_parallel_size)" if judge else
                               "this engine" + ("" if gpus else " (the CPU engine here ignores it)"))))
        if info.params:
            nb = 4 if e.dtype in ("float32", "float") else 2
            need = info.params * nb / tp
            cap = gpu_mem * e.gpu_memory_utilization if gpu_mem else None
            st = INFO if cap is None else (OK if need < 0.9 * cap else FAIL)
            rows.append(Row("GPU memory", f"{role.name} engine", st,
                            f"weights ~{gib(need)} per GPU ({info.params / 1e9:.1f}B x {nb} B / tp {tp})"
                            + (f" of {gib(cap)} vLLM may use" if cap else "; the rest of "
                               f"gpu_memory_utilization {e.gpu_memory_utilization} is KV cache")))
    if sft is None:
        return rows
    s = cfg.sft
    # SFT trains on the whole node (launch's GUIDEALIGN_NODE_GPUS), while a worker of `launch
    # run` sees only its engine's GPUs
    node = node_gpus()
    sft_gpus = devices_per_process(node or gpus)  # MIG: one device a process
    auto = str(s.num_processes).lower() == "auto"
    try:
        world = resolve_num_processes(s, gpus=sft_gpus)
        accum = accumulation_steps(s, world)
        idle = auto and 0 < world < sft_gpus
        rows.append(Row("SFT batch", "global batch", WARN if idle else OK,
                        f"micro {s.micro_batch_size} x accumulation {accum} x {world} process(es) "
                        f"= {s.global_batch_size}"
                        + (f"; {world} of the {sft_gpus} GPUs train: the batch does not split over "
                           "all of them" if idle else "")))
        if not sft_gpus and auto:
            for n in (8, 4):
                try:
                    a = accumulation_steps(s, n)
                    rows.append(Row("SFT batch", f"on {n} GPUs", OK,
                                    f"micro {s.micro_batch_size} x accumulation {a} x {n} = {s.global_batch_size}"))
                except ValueError as e:
                    rows.append(Row("SFT batch", f"on {n} GPUs", INFO, str(e)))
    except ValueError as e:
        world = 1
        rows.append(Row("SFT batch", "global batch", FAIL, str(e)))
    if sft.params:
        if not sft_gpus and auto:
            world = 8  # sized for a typical 8-GPU node when no GPU is visible here
        full = s.mode == "full"
        per = sft.params * (16 if full else 2)
        # FSDP in any spelling (fsdp: true, "full_shard", an fsdp_config, the accelerate config's
        # variables), as sft/precision.py tells; LoRA counts only DeepSpeed, as before
        sharded = sharded_training(s.trainer_args) if full else "deepspeed" in s.trainer_args
        need = per / (world if sharded else 1)
        what = ("bf16 weights + grads + fp32 Adam state, 16 B/param" if full
                else "frozen bf16 weights, 2 B/param, + adapters")
        st = INFO if not gpu_mem else (OK if need < 0.85 * gpu_mem else FAIL)
        rows.append(Row("GPU memory", "SFT", st,
                        f"~{gib(need)} per GPU before activations ({what}"
                        + (f", sharded over {world} GPUs" if sharded else "") + ")"
                        + ("" if gpus else "; no GPU visible here")
                        + (f" of {gib(gpu_mem)}" if gpu_mem else "")))
    return rows


def run_checks(cfg, workdir: str | None = None, gpus: list[str] | None = None,
               stages: list[str] | None = None) -> list[Row]:
    """Every check, or with ``stages`` (`run --stages`'s) those of the models and jobs these
    stages use: a run of the encoder stages and SFT does not need the engine's or eval's models."""
    from guidealign.core.gpu import visible_gpus as detect_gpus

    gpus = detect_gpus() if gpus is None else gpus
    gpu_mem = None
    if gpus:
        try:
            import torch

            gpu_mem = torch.cuda.get_device_properties(0).total_memory
        except Exception:  # noqa: BLE001
            gpu_mem = None
    rows: list[Row] = []
    infos: dict[str, ModelInfo] = {}
    engines, sft_info = [], None
    for role in roles(cfg):
        if stages is not None and not set(role.stages) & set(stages):
            continue
        info = infos.get(role.model) or locate(role.model)
        infos[role.model] = info
        rows += guarded("model", f"{role.name}: {role.model}", "", lambda: model_rows(cfg, role, info))
        if role.name == "SFT base":
            sft_info = info
        if role.engine is not None:
            engines.append((role, info))
            if info.template is False and not role.template:
                rows += context_rows(role, info)
                continue  # cannot build prompts: already a FAIL
            rows += guarded("max_model_len", role.name, "",
                            lambda: length_rows(cfg, role, load_local_tokenizer(info), info))
    # each group of checks on its own: one that raises is its FAIL row, and the others still run
    rows += guarded("GPUs", "engines and SFT", "", lambda: gpu_rows(cfg, engines, sft_info, gpus, gpu_mem))
    if stages is None or "sft" in stages:
        rows += guarded("SFT trainer", "sft", "", lambda: sft_rows(cfg))
    rows += guarded("disk", "run directory", "", lambda: [disk_row(cfg, workdir, sft_info)])
    rows += guarded("settings", "inputs, push and executor", "", lambda: other_rows(cfg, stages, workdir))
    if stages is None or "eval" in stages:
        rows += guarded("settings", "eval", "", lambda: eval_rows(cfg))
    return rows


def eval_rows(cfg) -> list[Row]:
    """The eval section as `guidealign eval` checks it before any work (eval.settings): the
    benchmark preset, the judges, the aggregation keys, the templates. No benchmark file is
    known here: ``eval.benchmark: auto`` is resolved per file when eval runs."""
    from guidealign.eval.settings import EvalError, check_config, resolve_settings

    ec, bad, st = cfg.eval, [], None
    # each on its own, so that one row names every bad key (the judges also under a bad preset)
    for fn in (lambda: check_config(ec), lambda: resolve_settings(ec, "benchmark.jsonl"),
               lambda: resolve_settings(dataclasses.replace(ec, benchmark="auto"), "benchmark.jsonl")):
        try:
            st = fn() or st
        except EvalError as e:
            bad += [] if str(e) in bad else [str(e)]
    if bad:
        return [Row("settings", "eval", FAIL, "; ".join(bad))]
    return [Row("settings", "eval", OK, f"benchmark {ec.benchmark}, judges "
                + (", ".join(st.judges) if ec.judges or ec.benchmark != "auto" else "by the benchmark's preset"))]


def render(rows: list[Row]) -> str:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        w = [max(len(getattr(r, k)) for r in rows) for k in ("check", "item", "status")]
        return "\n".join(f"{r.check:<{w[0]}}  {r.item:<{w[1]}}  {r.status:<{w[2]}}  {r.detail}" for r in rows)
    t = Table(title="guidealign check", show_lines=False)
    for c in ("check", "item", "status", "detail"):
        t.add_column(c, overflow="fold")
    color = {OK: "green", WARN: "yellow", FAIL: "bold red", INFO: "cyan"}
    for r in rows:
        t.add_row(r.check, r.item, f"[{color[r.status]}]{r.status}[/]", r.detail)
    console = Console(width=max(100, shutil.get_terminal_size((160, 20)).columns), record=True,
                      file=open(os.devnull, "w"))
    console.print(t)
    return console.export_text()


def failures(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.status == FAIL]
