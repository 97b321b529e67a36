"""One command per stage of the stage table (guidealign/stages.py), in the table's order.

Each command reads its own options and hands them to ``guidealign.executors.execute``,
which runs the stage function here (this rank) or on Ray, and prints the reports.
"""
from __future__ import annotations

import json
import logging
import os
from typing import get_args

import click

from guidealign.cli.options import error_line, ranks, stage_options
from guidealign.config.sft import ExportFormat

log = logging.getLogger("guidealign")
# commands after which the process may skip the collector's work at shutdown (``cli.main``):
# ingest closes what it opened itself and needs no finalizer run by the collector
QUICK_EXIT: list = []


def run_stage_command(name: str, cfg, workdir, rank, world_size, no_progress, *,
                      errors: tuple = (), **options) -> list:
    """Execute stage ``name``; ``errors`` become a clean error message (no traceback), and so
    does a RuntimeError: the stage's input is not there yet (``wait_complete``/``wait_done``:
    "run the stage that builds it first"), another rank failed, nothing moved (the traceback
    is logged at debug level, -vv)."""
    from guidealign.executors import ExecutorError, execute

    ranks(rank, world_size)  # a bad --rank/--world-size is a usage error
    try:
        reports = execute(name, cfg, workdir, rank=rank, world_size=world_size,
                          progress=not no_progress, **options)
    except ExecutorError as e:
        raise click.ClickException(f"{name}: {e}") from e
    except (ValueError, RuntimeError, OSError, *errors) as e:
        # (OSError: a model that is neither a local directory nor in the Hub cache on an offline
        # node, an unreadable file, a full disk: the message says which)
        log.debug("%s failed", name, exc_info=True)
        raise click.ClickException(error_line(e)) from e
    for rep in reports:
        summary = getattr(rep, "summary", None)
        if callable(summary):
            click.echo(summary())
        stats = getattr(rep, "stats", None)
        if stats:
            click.echo(json.dumps(stats, sort_keys=True))
    return reports


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("--into", default=None,
              help="Dataset under WORKDIR to write (default: prompts for the files given; with no files, "
                   "the config's inputs -> prompts and inputs_sft -> prompts-sft), e.g. prompts-sft.")
@click.option("--encoding", default=None,
              help="Text encoding of the inputs (default ingest.encoding: auto), e.g. cp1252, utf-16.")
@stage_options
def ingest(inputs, workdir, cfg, rank, world_size, no_progress, into, encoding):
    """Ingest JSONL/JSON/CSV/Parquet files (also .gz/.bz2/.xz/.zst), globs or saved datasets into prompt shards."""
    # ingest makes no BLAS call: without this, numpy's import starts a BLAS thread per core that
    # spins ~0.1 s of CPU each, beside the ingest threads (set before numpy is first imported)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from guidealign.ingest.readers import IngestError

    if encoding:
        cfg.ingest.encoding = encoding
    if into is not None and (why := _not_an_ingest_dataset(workdir, into)):
        raise click.UsageError(why)
    run_stage_command("ingest", cfg, workdir, rank, world_size, no_progress,
                      errors=(IngestError, ValueError), inputs=list(inputs) or None, dataset=into)
    QUICK_EXIT.append("ingest")


def _not_an_ingest_dataset(workdir, into: str) -> str | None:
    """Why ``--into`` must not name WORKDIR/<into>, or None: it holds another stage's output
    (respond, detect, an export, a model or index), which the ingest would replace. An
    earlier ingest's dataset (its manifest lists the input files; or, when an ingest was cut
    short before its manifest, shards of prompt columns only) may be ingested into again."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from guidealign.ingest.readers import _RUN_FILES
    from guidealign.ingest.run import PROMPT_SCHEMA
    from guidealign.shards import read_manifest
    from guidealign.shards.manifest import MANIFEST

    d = Path(workdir) / into
    if into in (".", "..") or "/" in into or os.sep in into or not d.is_dir():
        return None  # a new dataset; ingest refuses a name that is not one folder name
    where = f"--into {into}: {d}"
    hint = "ingest into a new dataset name (or the run's prompts / prompts-sft)"
    if (d / "_done.json").exists():
        return f"{where} holds a stage's model, index or report (its _done.json), not prompts: {hint}"
    if into in _RUN_FILES:
        return f"{where} holds the run's own records (push reports, failure markers), not prompts: {hint}"
    nested = [c.name for c in sorted(d.iterdir()) if (c / MANIFEST).is_file()]
    if nested:  # a folder of datasets (export/ holds export/<dataset>): ingest would mix into it
        return (f"{where} holds other datasets ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''}), "
                f"not prompts: {hint}")
    man = read_manifest(d)
    if man is not None:
        if "files" in man:  # what ingest writes: the input files it read
            return None
        return (f"{where} holds the dataset of stage {man.get('stage', '?')!r}, which this ingest "
                f"would overwrite: {hint}")
    for shard in sorted(d.glob("shard-*.parquet")):
        try:
            names = set(pq.read_schema(shard).names)
        except Exception:  # noqa: BLE001 - damaged: the ingest rewrites it
            continue
        if not names <= set(PROMPT_SCHEMA.names):  # the columns of a prompt set
            extra = ", ".join(sorted(names - set(PROMPT_SCHEMA.names)))
            return (f"{where} holds shards of another stage than ingest (columns {extra}), which this "
                    f"ingest would overwrite: {hint}")
        break
    return None


def _template_errors() -> tuple:
    from guidealign.gen.build import TemplateError

    return (TemplateError, ValueError)


@click.command()
@stage_options
def detect(workdir, cfg, rank, world_size, no_progress):
    """Label each prompt risky or not (WORKDIR/prompts -> WORKDIR/detect)."""
    run_stage_command("detect", cfg, workdir, rank, world_size, no_progress, errors=_template_errors())


@click.command()
@stage_options
def guidelines(workdir, cfg, rank, world_size, no_progress):
    """Write safety or quality guidelines per prompt (WORKDIR/detect -> WORKDIR/guidelines)."""
    run_stage_command("guidelines", cfg, workdir, rank, world_size, no_progress,
                      errors=_template_errors())


@click.command("library")
@stage_options
def library(workdir, cfg, rank, world_size, no_progress):
    """De-duplicate the guideline shards into the guideline library (+ training pairs)."""
    run_stage_command("library", cfg, workdir, rank, world_size, no_progress)


@click.command("train-retriever")
@stage_options
def train_retriever(workdir, cfg, rank, world_size, no_progress):
    """Fine-tune the bi-encoder retriever and report recall@k/MRR vs the base encoder and BM25."""
    run_stage_command("train-retriever", cfg, workdir, rank, world_size, no_progress)


@click.command("index")
@stage_options
def index(workdir, cfg, rank, world_size, no_progress):
    """Embed the library and build the FAISS index (versioned against the library)."""
    run_stage_command("index", cfg, workdir, rank, world_size, no_progress)


@click.command("retrieve")
@click.option("--src", default=None,
              help="Input stage under WORKDIR whose shards hold id and prompt (default: "
                   "retrieve.prompts, else prompts-sft when inputs_sft is set, else prompts).")
@click.option("--dst", default="retrieve", show_default=True, help="Output stage under WORKDIR.")
@stage_options
def retrieve(workdir, cfg, rank, world_size, no_progress, src, dst):
    """Retrieve the top guidelines for every prompt (top N, near-duplicates dropped, k kept)."""
    from guidealign.retrieval.index import IndexVersionError

    run_stage_command("retrieve", cfg, workdir, rank, world_size, no_progress,
                      errors=(IndexVersionError,), src=src, dst=dst)


@click.command("respond")
@click.option("--no-guidelines", is_flag=True,
              help="Unguided baseline: answer the prompt set without guidelines (respond.prompts, "
                   "else prompts-sft when inputs_sft is set, else prompts; into WORKDIR/respond-baseline).")
@click.option("--src", default=None, help="Input dataset under WORKDIR (default: retrieve, or with "
                                          "--no-guidelines the prompt set above).")
@click.option("--dst", default=None, help="Output dataset under WORKDIR (default: respond, or "
                                          "respond-baseline with --no-guidelines).")
@stage_options
def respond(no_guidelines, src, dst, workdir, cfg, rank, world_size, no_progress):
    """Answer each prompt with vLLM, guided by its retrieved guidelines (the aligned dataset)."""
    run_stage_command("respond", cfg, workdir, rank, world_size, no_progress,
                      errors=(RuntimeError, ValueError), guided=not no_guidelines, src=src, dst=dst)


@click.command("sft")
@click.option("--force", is_flag=True, help="Train again even if WORKDIR/sft is done with this config.")
@stage_options
def sft(force, workdir, cfg, rank, world_size, no_progress):
    """Fine-tune the base model on the guided responses (without guidelines) with TRL.

    Several GPUs: `accelerate launch -m guidealign sft ...` or `torchrun --nproc-per-node N
    -m guidealign sft ...` with the same config.
    """
    for done in run_stage_command("sft", cfg, workdir, rank, world_size, no_progress,
                                  errors=(FileNotFoundError, ValueError), force=force):
        if done.get("reason"):
            click.echo(f"sft: {done['reason']}")
        elif done.get("skipped"):
            click.echo(f"sft: already done ({workdir}/sft/model)")
        else:
            click.echo(f"sft: {done['rows']} examples, {done['steps']} steps, loss "
                       f"{done['first_loss']:.4f} -> {done['last_loss']:.4f}, dropped "
                       f"{json.dumps(done['dropped'])}, {done['seconds']:.0f}s -> {workdir}/sft/model")


@click.command()
@stage_options
def augment(workdir, cfg, rank, world_size, no_progress):
    """Generate new risky questions per risk type, self-instruct style (-> WORKDIR/augment).

    Use them as a run's prompts with --set detect.input=augment, or ingest them:
    guidealign ingest 'WORKDIR/augment/shard-*.parquet' -w OTHER_WORKDIR."""
    run_stage_command("augment", cfg, workdir, rank, world_size, no_progress, errors=_template_errors())


@click.command()
@click.argument("dataset", default="respond")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: WORKDIR/export/DATASET).")
@click.option("--columns", default=None, help="Comma-separated columns to keep (default: all).")
@click.option("--format", "fmt", type=click.Choice(get_args(ExportFormat)), default="jsonl", show_default=True,
              help="File format of the exported shards.")
@stage_options
def export(dataset, out, columns, fmt, workdir, cfg, rank, world_size, no_progress):
    """Write the shards of WORKDIR/DATASET (default: respond) as JSONL, one file per shard.

    Sharded like every map stage (--rank/--world-size, RANK/WORLD_SIZE, a SLURM array, or
    --executor ray); committed shards are skipped on a rerun. `cat OUT/shard-*.jsonl`
    joins them in order.
    """
    from pathlib import Path

    from guidealign.show import not_a_dataset

    if why := not_a_dataset(Path(workdir), dataset, "DATASET"):
        raise click.ClickException(why)  # a misspelt name: the datasets there, not "run the stage first"
    from guidealign.status import not_ready

    src = Path(workdir) / dataset
    if why := not_ready(src):  # its shards are current one by one, but not the whole artifact (the library)
        raise click.ClickException(f"{src} is not done: {why}; `guidealign status {workdir}` shows it: "
                                   "run its stage to build it, then export again")
    reports = run_stage_command(
        "export", cfg, workdir, rank, world_size, no_progress, errors=(FileNotFoundError, ValueError),
        dataset=dataset, out=str(Path(out).absolute()) if out else None, fmt=fmt,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None)
    # pending: every input shard left for later; stale ones among them are committed, damaged
    # ones have a marker but a file cut short, gone or not the bytes it commits (no later export
    # takes them: verify does); each report says which
    left = {i for r in reports for i in (getattr(r, "pending", []) or [])}
    damaged = {i for r in reports for i in (getattr(r, "damaged", []) or [])}
    stale = sum(len(getattr(r, "stale", []) or []) for r in reports)
    pending = len(left) - stale - len(damaged)
    why = []
    if damaged:
        shown = ", ".join(map(str, sorted(damaged)[:10])) + (" ..." if len(damaged) > 10 else "")
        why.append(f"input shard(s) {shown} of {dataset} are damaged (the file cut short or missing, "
                   f"against its marker): run `guidealign verify {workdir} --repair`, rerun the stage "
                   "that writes it, then export again")
    if stale:  # committed, but under an earlier config or from input that has changed since
        why.append(f"{stale} input shard(s) of {dataset} are stale (committed under another config "
                   "or input): rerun the stage that writes it, then export again")
    if pending:
        why.append(f"{pending} input shard(s) of {dataset} are not committed yet: finish the stage, "
                   "then export again")
    if why:
        retired = sum(len(getattr(r, "retired", []) or []) for r in reports)
        raise click.ClickException("; ".join(why) + (f" ({retired} earlier export shard(s) made "
                                                     "from them were removed)" if retired else ""))
