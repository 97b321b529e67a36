"""Review s35 of the SFT data: answers to prompts respond truncated, examples longer than
sft.max_seq_length, and `packing` in sft.trainer_args (review items 9, 4 and 3)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard

TINY = Path(__file__).resolve().parents[1] / "configs" / "sft-tiny-cpu.yaml"
LONG = "This answer goes on and on. " * 60  # ~420 tokens: longer than max_seq_length 256


def _row(i, response="A short answer.", note=""):
    return dict(id=f"r{i}", prompt=f"Question number {i}?", guideline_ids=["g"], guideline_texts=["Be kind."],
                response=response, finish_reason="stop", model="m", prompt_tokens=10, output_tokens=10,
                note=note)


def _write_respond(workdir, rows):
    d = Path(workdir) / "respond"
    write_manifest(d, stage="respond", num_shards=1, fingerprint="test")
    write_shard(d, 0, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), "fp0")


def _truncation_note(generator_path) -> str:
    """The note respond writes for a prompt whose user text it cut (gen/respond.py)."""
    from transformers import AutoTokenizer

    from guidealign.gen.respond import build_messages, chat_ids, prepare_prompt

    tok = AutoTokenizer.from_pretrained(generator_path)
    rcfg = load_config(None).respond
    prompt = "word " * 60
    budget = len(chat_ids(tok, build_messages(rcfg, prompt, ["Be kind."]))) - 20
    p = prepare_prompt(tok, rcfg, prompt, ["g"], ["Be kind."], budget, "truncate")
    assert p.ids is not None and p.guideline_texts == ["Be kind."] and "truncated" in p.note
    return p.note


def _tokenizer(cfg):
    from guidealign.core.models import resolve
    from guidealign.sft.train import prepare_tokenizer

    return prepare_tokenizer(cfg.sft, resolve(cfg.sft.base_model))[0]


def test_an_answer_to_a_truncated_prompt_is_dropped_and_counted(workdir, generator_path):
    """Item 9: respond answered the prompt's tail but stores the whole prompt; SFT trained on
    (whole prompt -> answer to its tail) and counted nothing."""
    from guidealign.sft.data import build_dataset

    note = _truncation_note(generator_path)
    _write_respond(workdir, [_row(0), _row(1, note=note), _row(2, note="engine retried once")])
    ds, rep = build_dataset(load_config(TINY).sft, workdir)
    assert rep.dropped == {"input_truncated": 1}
    assert rep.kept == 2 and [e["id"] for e in ds] == ["r0", "r2"]


def test_examples_longer_than_max_seq_length_are_dropped_or_counted_as_cut(tmp_path):
    """Item 4: TRL keeps the start of an overlong example, so its answer loses the end-of-turn
    token; nothing counted it. The length is TRL's own (its tokenized input_ids)."""
    from datasets import Dataset

    from guidealign.sft.data import DataReport, example_lengths, fit_max_seq_length, to_example
    from guidealign.sft.train import build_trainer

    cfg = load_config(TINY)
    ds = Dataset.from_list([to_example(cfg.sft, _row(0)), to_example(cfg.sft, _row(1, LONG))])
    tok = _tokenizer(cfg)

    rep = DataReport(rows=2, kept=2)
    kept = fit_max_seq_length(cfg.sft, ds, tok, rep)
    assert [e["id"] for e in kept] == ["r0"] and rep.kept == 1
    assert rep.dropped == {"longer_than_max_seq_length": 1} and rep.cut_at_max_seq_length == 0

    cfg.sft.drop_overlong = False
    rep = DataReport(rows=2, kept=2)
    assert len(fit_max_seq_length(cfg.sft, ds, tok, rep)) == 2
    assert rep.dropped == {} and rep.kept == 2 and rep.cut_at_max_seq_length == 1

    # the lengths are those TRL tokenizes (no max_length cut here)
    cfg.sft.max_seq_length = 4096
    trainer, *_ = build_trainer(cfg, tmp_path, ds, world=1, progress=False, ckpt_dir=tmp_path / "ck")
    assert example_lengths(tok, ds) == [len(e["input_ids"]) for e in trainer.train_dataset]
    assert example_lengths(tok, ds)[1] > 256


def test_max_examples_is_taken_after_the_overlong_examples_are_dropped(tmp_path):
    """sft.max_examples capped the examples as they were read, before the length filter: two
    overlong examples first left 0 of 2 (an error saying none fits) though three fit."""
    from datasets import Dataset

    from guidealign.sft.data import DataReport, fit_max_seq_length, to_example

    cfg = load_config(TINY, ["sft.max_examples=2"])
    rows = [_row(0, LONG), _row(1, LONG), _row(2), _row(3), _row(4)]
    ds = Dataset.from_list([to_example(cfg.sft, r) for r in rows])
    tok = _tokenizer(cfg)
    rep = DataReport(rows=5, kept=5)
    kept = fit_max_seq_length(cfg.sft, ds, tok, rep)
    assert [e["id"] for e in kept] == ["r2", "r3"] and rep.kept == 2
    assert rep.dropped == {"longer_than_max_seq_length": 2, "over_max_examples": 1}
    cfg.sft.drop_overlong = False  # the cap keeps the first two; both are counted as cut
    rep = DataReport(rows=5, kept=5)
    assert [e["id"] for e in fit_max_seq_length(cfg.sft, ds, tok, rep)] == ["r0", "r1"]
    assert rep.dropped == {"over_max_examples": 3} and rep.cut_at_max_seq_length == 2


def test_max_examples_bounds_what_sft_reads_of_a_large_output(workdir):
    """With the cap taken after the length filter, a smoke run (max_examples 2) read and
    tokenized every row of the output; it reads a bounded surplus now."""
    from guidealign.sft.data import build_dataset, max_examples_read

    _write_respond(workdir, [_row(i) for i in range(300)])
    ds, rep = build_dataset(load_config(TINY, ["sft.max_examples=2"]).sft, workdir)
    assert len(ds) == rep.kept == max_examples_read(2) < 300
    assert rep.dropped == {"over_max_examples": 300 - max_examples_read(2)}


def test_a_short_answer_is_not_called_empty(workdir):
    from guidealign.sft.data import build_dataset

    _write_respond(workdir, [_row(0), _row(1, "Too short."), _row(2, "   ")])
    ds, rep = build_dataset(load_config(TINY, ["sft.min_response_chars=12"]).sft, workdir)
    assert rep.dropped == {"shorter_than_min_response_chars": 1, "empty_response": 1}
    assert [e["id"] for e in ds] == ["r0"]


@pytest.mark.slow
def test_packing_keeps_the_example_count_and_done_counts_overlong_and_truncated_inputs(workdir,
                                                                                      generator_path):
    """Items 3, 4, 9 in one tiny run: with `packing: true`, _done.json and the model card said
    2 examples trained and 18 dropped (packed sequences taken for examples); the overlong example
    and the answer to a truncated prompt are dropped and counted there."""
    from guidealign.sft.train import run_sft

    rows = [_row(i) for i in range(20)] + [_row(20, LONG), _row(21, note=_truncation_note(generator_path))]
    _write_respond(workdir, rows)
    cfg = load_config(TINY, ["sft.max_steps=1", "sft.num_threads=2", "sft.trainer_args={packing: true}"])
    done = run_sft(cfg, workdir, progress=False)
    assert done["read"] == 22 and done["rows"] == 20
    assert done["dropped"] == {"longer_than_max_seq_length": 1, "input_truncated": 1}
    assert done["cut_at_max_seq_length"] == 0
    card = (workdir / "sft" / "model" / "README.md").read_text()
    assert "examples: 20" in card and "longer_than_max_seq_length: 1" in card
    assert "no_response_tokens_within_max_seq_length" not in card
