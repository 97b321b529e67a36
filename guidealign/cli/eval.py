"""``guidealign eval``: the evaluation command."""
from __future__ import annotations

import dataclasses
from typing import get_args

import click

from guidealign.cli.options import ranks, stage_options
from guidealign.config.eval import JUDGES, PRESETS, HarmJudge


@click.command("eval")
@click.argument("benchmark_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--benchmark", type=click.Choice(["auto", *PRESETS]),
              default=None, help="Preset: category field and judges (default: eval.benchmark, "
                                 "auto = from the file name).")
@click.option("--name", default=None, help="Evaluation name: WORKDIR/eval/NAME/ (default: the benchmark).")
@click.option("--category-field", default=None,
              help='JSONL field holding the category ("" for none; default: the preset\'s).')
@click.option("--judge", "judges", multiple=True, type=click.Choice(JUDGES),
              help="Judge(s) to run (repeatable; default: the preset's).")
@click.option("--guided-responses", type=click.Path(exists=True, file_okay=False), default=None,
              help="Precomputed guided response shards (else: retrieve + respond).")
@click.option("--unguided-responses", type=click.Path(exists=True, file_okay=False), default=None,
              help="Precomputed unguided response shards (else: respond without guidelines).")
@click.option("--judge-model", default=None, help="LLM judge: local path or Hub id.")
@click.option("--harm-judge", type=click.Choice(get_args(HarmJudge)), default=None,
              help="Harmfulness judge kind (default: eval.harm_judge).")
@click.option("--classifier-model", default=None,
              help="Sequence classifier for harmfulness (path or id, e.g. LibrAI/longformer-harmful-ro).")
@stage_options
def eval_cmd(benchmark_file, benchmark, name, category_field, judges, guided_responses,
             unguided_responses, judge_model, harm_judge, classifier_model, workdir, cfg, rank,
             world_size, no_progress):
    """Evaluate responses with and without retrieved guidelines on a benchmark JSONL
    (lines: id, prompt, category) and write a report under WORKDIR/eval/NAME/report/."""
    from guidealign.cli.stage_commands import run_stage_command
    from guidealign.eval.settings import EvalError

    over = {k: v for k, v in dict(benchmark=benchmark, name=name, category_field=category_field,
                                  guided_responses=guided_responses,
                                  unguided_responses=unguided_responses, judge_model=judge_model,
                                  harm_judge=harm_judge, classifier_model=classifier_model).items()
            if v is not None}
    if judges:
        over["judges"] = list(judges)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **over))
    reports = run_stage_command("eval", cfg, workdir, rank, world_size, no_progress, errors=(EvalError,),
                                benchmark_file=benchmark_file)
    if not any(reports):
        click.echo(f"eval: rank {ranks(rank, world_size)[0]} done with its shards")
