"""Click commands of the retrieval stages (registered in guidealign/cli.py)."""
from __future__ import annotations

import click

from guidealign.cli.options import ranks, stage_options


@click.command("library")
@stage_options
def library(workdir, cfg, rank, world_size, no_progress):
    """De-duplicate the guideline shards into the guideline library (+ training pairs)."""
    from guidealign.retrieval.library import run_library

    r, w = ranks(rank, world_size)
    rep = run_library(cfg, workdir, rank=r, world_size=w, progress=not no_progress)
    click.echo(rep.summary() if r == 0 else f"library: built by rank 0 (this is rank {r})")


@click.command("train-retriever")
@stage_options
def train_retriever(workdir, cfg, rank, world_size, no_progress):
    """Fine-tune the bi-encoder retriever and report recall@k/MRR vs the base encoder and BM25."""
    from guidealign.retrieval.train import run_train_retriever

    r, w = ranks(rank, world_size)
    rep = run_train_retriever(cfg, workdir, rank=r, world_size=w, progress=not no_progress)
    click.echo(rep.summary() if r == 0 else f"train-retriever: trained by rank 0 (this is rank {r})")


@click.command("index")
@stage_options
def index(workdir, cfg, rank, world_size, no_progress):
    """Embed the library and build the FAISS index (versioned against the library)."""
    from guidealign.retrieval.index import run_index

    r, w = ranks(rank, world_size)
    rep = run_index(cfg, workdir, rank=r, world_size=w, progress=not no_progress)
    click.echo(rep.summary() if r == 0 else f"index: built by rank 0 (this is rank {r})")


@click.command("retrieve")
@click.option("--src", default=None,
              help="Input stage under WORKDIR whose shards hold id and prompt (default: "
                   "retrieve.prompts, else prompts-sft when inputs_sft is set, else prompts).")
@click.option("--dst", default="retrieve", show_default=True, help="Output stage under WORKDIR.")
@stage_options
def retrieve(workdir, cfg, rank, world_size, no_progress, src, dst):
    """Retrieve the top guidelines for every prompt (top N, near-duplicates dropped, k kept)."""
    from guidealign.retrieval.index import IndexVersionError
    from guidealign.retrieval.retrieve import run_retrieve

    r, w = ranks(rank, world_size)
    try:
        rep = run_retrieve(cfg, workdir, rank=r, world_size=w, src=src, dst=dst,
                           progress=not no_progress)
    except IndexVersionError as e:
        raise click.ClickException(str(e)) from e
    click.echo(rep.summary())


COMMANDS = [library, train_retriever, index, retrieve]
