"""The SFT training set: response shards -> prompt/completion conversations -> token ids.

Each example is the user prompt and the assistant response, *without* the guidelines
(the point of Guide-Align's SFT: the model learns to behave well unprompted). The
conversations are tokenized here (``tokenize_dataset``), by gen/build.py's PromptBuilder, the
code respond and eval render prompts with: the template's markup with its control tokens, the
contents as plain text, so ``<|im_end|>``, ``<|im_start|>system`` or ``</s>`` written in a prompt
or an answer stay text, as vLLM was and will be fed them (they cannot forge a system turn or end
the answer early). The prompt's ids are those respond gives the prompt (assistant turn opened);
the completion is the rest of the rendered conversation: the answer and the template's
end-of-turn markup. SFTTrainer takes these ``input_ids`` as they are, with a
``completion_mask``, and computes the loss on the completion only (no generation markers are
needed in the chat template); for text without control-token strings the ids are those TRL's own
tokenization gave.
Truncated (finish_reason "length"), failed and empty responses are dropped and counted, and so
are answers to a prompt respond truncated (the answer was written for the prompt's tail, SFT
would pair it with the whole prompt) and, with ``sft.drop_overlong``, examples longer than
``sft.max_seq_length`` (TRL keeps their start: the answer would lose its end-of-turn token).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from guidealign.gen.yieldstats import input_truncated

log = logging.getLogger(__name__)

COLUMNS = ["id", "prompt", "response", "finish_reason"]
# read when the shard has it (respond always writes it): says whether respond truncated the prompt
OPTIONAL_COLUMNS = ["note"]


@dataclass
class DataReport:
    rows: int = 0           # response rows read
    kept: int = 0           # training examples
    # examples longer than max_seq_length kept (sft.drop_overlong false): TRL cuts their end
    cut_at_max_seq_length: int = 0
    # the places among the examples of those whose answer stopped at respond's max_tokens
    # (sft.keep_finish_reasons holds "length"): trained as if whole, so the model learns to stop
    # mid-sentence
    cut_examples: list = field(default_factory=list, repr=False)
    dropped: dict = field(default_factory=dict)  # reason -> count
    # dataset name (as configured in sft.data, never an absolute path of the run dir) ->
    # {"shards", "sha256": [...]}: what the fingerprint depends on, so a moved run dir is reused
    sources: dict = field(default_factory=dict)
    # the same names -> where each was read (relative to the run dir when inside it, else its
    # absolute path): not in the fingerprint; `push model` and `status` check those shards
    paths: dict = field(default_factory=dict)

    @property
    def kept_cut_at_max_tokens(self) -> int:
        return len(self.cut_examples)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        cut = [f"{self.cut_at_max_seq_length} cut at max_seq_length"] if self.cut_at_max_seq_length else []
        if self.kept_cut_at_max_tokens:
            cut.append(f"{self.kept_cut_at_max_tokens} whose answer was cut at respond's max_tokens")
        cut_s = f" ({'; '.join(cut)})" if cut else ""
        return f"{self.rows} responses read, {self.kept} examples kept{cut_s}, dropped: {why}"

    def drop(self, why: str, n: int = 1) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + n


def data_paths(cfg, workdir) -> list[Path]:
    out = []
    for d in cfg.data:
        p = Path(d)
        out.append(p if p.is_absolute() else Path(workdir) / d)
    return out


def source_name(path: Path, workdir) -> str:
    """A dataset's name for reports and fingerprints: relative to the run dir when inside it,
    else its directory name (its contents are identified by the shard checksums)."""
    try:
        return path.resolve().relative_to(Path(workdir).resolve()).as_posix()
    except ValueError:
        return path.name


def drop_reason(cfg, row: dict) -> str | None:
    prompt, resp, fr = row.get("prompt"), row.get("response"), row.get("finish_reason")
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty_prompt"
    if fr not in cfg.keep_finish_reasons:
        return "truncated" if fr == "length" else f"finish_reason_{fr}"
    if not isinstance(resp, str) or len(resp.strip()) < cfg.min_response_chars:
        return "shorter_than_min_response_chars" if isinstance(resp, str) and resp.strip() else "empty_response"
    if input_truncated(row):
        return "input_truncated"
    return None


def to_example(cfg, row: dict) -> dict:
    prompt = [{"role": "user", "content": row["prompt"]}]
    if cfg.system_prompt:
        prompt.insert(0, {"role": "system", "content": cfg.system_prompt})
    return {"id": row["id"], "prompt": prompt,
            "completion": [{"role": "assistant", "content": row["response"].strip()}]}


def complete_shards(path: Path) -> list[int]:
    """The shards of a finished response stage (all of them); a clear error when there are none,
    or when some are not committed yet, or were committed under another config or input (SFT
    would otherwise train on part of the responses, or a mix of two runs)."""
    from guidealign.shards import read_manifest
    from guidealign.shards.manifest import shard_states

    man = read_manifest(path)
    if man is None:
        raise FileNotFoundError(f"{path} holds no response shards: run `guidealign respond` first")
    missing, stale = shard_states(path)
    if missing or stale:
        what = ", ".join(x for x in (f"{len(missing)} not committed (e.g. {missing[:5]})" if missing else "",
                                      f"{len(stale)} committed under another config or input "
                                      f"(e.g. {stale[:5]})" if stale else "") if x)
        raise ValueError(f"{path} is incomplete: of its {man['num_shards']} shard(s), {what}; "
                         f"finish the stage that writes it (`guidealign respond`) first")
    return list(range(int(man["num_shards"])))


def open_shard(path: Path, index: int):
    """The Parquet file of shard ``index``, checked for the columns SFT reads; a clear error
    naming the file when it cannot be read or lacks one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from guidealign.shards.layout import shard_path

    f = shard_path(path, index)
    try:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f} cannot be read ({type(e).__name__}: {e}): check it with "
                         "`guidealign verify` and rerun the stage that writes it") from e
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{f} has no column(s) {missing}: sft.data must name response stages "
                         f"(columns {COLUMNS}), e.g. respond")
    return pf


def iter_rows(path: Path, index: int, batch_size: int = 8192):
    """The rows of one shard, a record batch at a time; a read error names the file."""
    import pyarrow as pa

    from guidealign.shards.layout import shard_path

    pf = open_shard(path, index)
    try:
        names = set(pf.schema_arrow.names)
        columns = COLUMNS + [c for c in OPTIONAL_COLUMNS if c in names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{shard_path(path, index)} cannot be read "
                         f"({type(e).__name__}: {e}): check it with `guidealign verify` and "
                         "rerun the stage that writes it") from e


def max_examples_read(n: int) -> int:
    """How many usable rows SFT reads (and tokenizes) for ``sft.max_examples`` n: enough that
    overlong ones among the first do not leave it short, bounded so that a smoke run over a
    large output does not tokenize all of it."""
    return 4 * n + 64


def check_listed_once(paths: list[Path], names: list[str]) -> None:
    """Refuse a response dataset that ``sft.data`` lists twice (``respond`` and the same folder
    by its absolute path): each of its examples was trained twice, with no word (the report
    showed two datasets). Two folders of one name (/a/respond, /b/respond) are two datasets."""
    seen: dict[Path, str] = {}
    for path, name in zip(paths, names):
        where = path.resolve()
        if where in seen:
            raise ValueError(f"sft.data lists the dataset {where} twice ({seen[where]!r} and {name!r}): "
                             "each of its examples would be trained twice; list it once")
        seen[where] = name


def iter_examples(cfg, workdir, report: DataReport):
    """Stream the examples of all shards of the (complete) response stages, one record batch
    in memory; the shards read are the ones whose checksums go into ``report.sources``."""
    from guidealign.shards import read_marker

    paths = data_paths(cfg, workdir)
    check_listed_once(paths, cfg.data)
    for path in paths:
        idx = complete_shards(path)
        name = source_name(path, workdir)
        if name in report.sources:  # another dataset of this directory name (/a/respond, /b/respond)
            name = path.as_posix()
            k = 2
            while name in report.sources:  # the same path listed twice
                name, k = f"{path.as_posix()}#{k}", k + 1
        report.sources[name] = {"shards": len(idx),
                                "sha256": [read_marker(path, i).sha256 for i in idx]}
        try:
            report.paths[name] = path.resolve().relative_to(Path(workdir).resolve()).as_posix()
        except ValueError:
            report.paths[name] = str(path.resolve())
        for i in idx:
            for row in iter_rows(path, i):
                report.rows += 1
                why = drop_reason(cfg, row)
                if why:
                    report.drop(why)
                    continue
                if cfg.max_examples and report.kept >= max_examples_read(cfg.max_examples):
                    report.drop("over_max_examples")  # read no further into a large output
                    continue
                report.kept += 1  # sft.max_examples applies after the length filter
                if row.get("finish_reason") == "length":  # kept by sft.keep_finish_reasons
                    report.cut_examples.append(report.kept - 1)
                yield to_example(cfg, row)


def build_dataset(cfg, workdir):
    """(datasets.Dataset with id/prompt/completion, DataReport)."""
    from datasets import Dataset

    report = DataReport()
    rows = list(iter_examples(cfg, workdir, report))
    if not rows:
        raise ValueError(f"no training examples in {[str(p) for p in data_paths(cfg, workdir)]} "
                         f"({report.summary()})")
    return Dataset.from_list(rows), report


def prompt_builder(tok):
    """gen/build.py's PromptBuilder on SFT's tokenizer (prepare_tokenizer set its chat
    template), without a length limit: the rendering respond and eval feed vLLM."""
    from guidealign.gen.build import PromptBuilder

    return PromptBuilder(tok, max_model_len=sys.maxsize)


def _messages(turns: list[dict]):
    from guidealign.gen.build import Message

    return [Message(m["role"], [m["content"]]) for m in turns]


def tokenize_example(builder, example: dict) -> dict:
    """``input_ids`` (the rendered prompt + completion conversation) and ``completion_mask``
    (1 on the completion) of one prompt/completion example. The prompt part is the builder's ids
    of the prompt with the assistant turn opened (what respond feeds vLLM); the completion is the
    rest of the conversation rendered whole: the answer as plain text and the template's
    end-of-turn markup (``<|im_end|>`` and a newline, `` </s>``...)."""
    prompt = builder.build(_messages(example["prompt"]), 0).token_ids
    full = builder.build(_messages(example["prompt"] + example["completion"]), 0,
                         add_generation_prompt=False).token_ids
    n = len(prompt)
    if full[:n] != prompt:
        # TRL's rule for a template that renders the prompt alone otherwise than followed by an
        # answer, or tokens merging across the boundary: the completion starts where they differ
        n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(n, len(full)))
        _warn_once("prefix", "the chat template renders the prompt alone (assistant turn opened) "
                   "otherwise than followed by the answer; the completion starts where they differ, "
                   "so training sees a prompt that differs from the one vLLM is fed: %r",
                   builder.tok.decode(prompt[n:]))
    return {"input_ids": list(full), "completion_mask": [0] * n + [1] * (len(full) - n)}


_WARNED: set = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("sft: " + msg, *args)


def _ends_with_control_token(tok, ids: list[int]) -> bool:
    """Whether the last token of ``ids`` that is not whitespace (chatml's newline after
    ``<|im_end|>``) is a control token (eos, the template's turn end)."""
    specials = set(getattr(tok, "all_special_ids", []) or [])
    specials.update(i for i, t in (getattr(tok, "added_tokens_decoder", {}) or {}).items()
                    if getattr(t, "special", False))
    for i in reversed(ids):
        if i in specials:
            return True
        if tok.decode([i]).strip():
            return False
    return False


def tokenize_dataset(tok, dataset):
    """The prompt/completion dataset tokenized by ``tokenize_example`` (id, input_ids,
    completion_mask): the pre-tokenized form SFTTrainer trains as it is. A dataset that already
    has ``input_ids`` is returned unchanged."""
    if "input_ids" in dataset.column_names:
        return dataset
    builder = prompt_builder(tok)
    ids, masks = [], []
    for ex in dataset.select_columns(["prompt", "completion"]):
        out = tokenize_example(builder, ex)
        ids.append(out["input_ids"])
        masks.append(out["completion_mask"])
        done = [t for t, m in zip(out["input_ids"], out["completion_mask"]) if m]
        if not _ends_with_control_token(tok, done):
            _warn_once("end", "the chat template ends an assistant turn with no control token "
                       "(%r): the model does not learn to stop", tok.decode(done[-8:]))
    rest = dataset.remove_columns([c for c in ("prompt", "completion") if c in dataset.column_names])
    return rest.add_column("input_ids", ids).add_column("completion_mask", masks)


def example_lengths(tok, dataset) -> list[int]:
    """Each example's training length in tokens, as SFTTrainer sees it before truncating to
    max_length: its ``input_ids`` (``tokenize_dataset``; a prompt/completion dataset is
    tokenized for the count)."""
    return [len(x) for x in tokenize_dataset(tok, dataset)["input_ids"]]


def _check_some_answer_fits(cfg, tokenized, keep: list[int], long_set: set, report: DataReport) -> None:
    """With ``sft.drop_overlong`` false, TRL cuts an overlong example at max_seq_length and drops
    it when no answer token is left (its prompt alone fills the length): when that is every
    example kept, training failed only after the model was loaded, with torch's "num_samples
    should be a positive integer value, but got num_samples=0". A clear error here instead."""
    n = cfg.max_seq_length
    masks = tokenized.select([i for i in keep if i in long_set])["completion_mask"]
    answerless = sum(1 not in m[:n] for m in masks)
    if keep and answerless == len(keep):
        raise ValueError(f"no training example has an answer token within sft.max_seq_length ({n} tokens): "
                         f"the prompt alone fills it in all {len(keep)} example(s) kept ({report.summary()}); "
                         "raise sft.max_seq_length")


def fit_max_seq_length(cfg, dataset, tok, report: DataReport):
    """The examples longer than ``cfg.max_seq_length`` are dropped (``cfg.drop_overlong``) or
    counted in ``report.cut_at_max_seq_length`` (TRL trains their start, without the answer's
    end-of-turn token); then the first ``cfg.max_examples`` of the rest are kept (0: all), so
    overlong examples early in the shards do not take the places of later ones that fit.
    Returns the dataset to train on."""
    long = [i for i, n in enumerate(example_lengths(tok, dataset)) if n > cfg.max_seq_length]
    long_set = set(long)
    keep = list(range(len(dataset)))
    if long and not cfg.drop_overlong:
        report.cut_at_max_seq_length = len(long)
    elif long:
        report.drop("longer_than_max_seq_length", len(long))
        report.kept -= len(long)
        if not report.kept:
            raise ValueError(f"no training example fits sft.max_seq_length ({cfg.max_seq_length} tokens): "
                             f"{report.summary()}; raise it or set sft.drop_overlong: false")
        keep = [i for i in keep if i not in long_set]
    if cfg.max_examples and len(keep) > cfg.max_examples:
        report.drop("over_max_examples", len(keep) - cfg.max_examples)
        report.kept = cfg.max_examples
        if not cfg.drop_overlong:
            report.cut_at_max_seq_length = sum(i in long_set for i in keep[:cfg.max_examples])
        keep = keep[:cfg.max_examples]
    if long and not cfg.drop_overlong and not cfg.trainer_args.get("packing"):
        _check_some_answer_fits(cfg, tokenize_dataset(tok, dataset), keep, long_set, report)
    if report.cut_examples:
        cut = set(report.cut_examples)
        report.cut_examples = [j for j, i in enumerate(keep) if i in cut]  # places among those kept
    if report.cut_examples:
        log.warning("sft: %d training example(s) end where respond's max_tokens cut their answer "
                    "(sft.keep_finish_reasons holds \"length\"): the model learns to stop there",
                    report.kept_cut_at_max_tokens)
    return dataset if len(keep) == len(dataset) else dataset.select(keep)
