"""Answers cut at respond's max_tokens that SFT keeps (``sft.keep_finish_reasons`` holding
"length") are trained as if whole, so the model learns to stop mid-sentence; nothing SFT
reported counted them. Now the data report, its summary, ``_done.json`` and the model card's
data block carry ``kept_cut_at_max_tokens``, counted over the examples actually trained on."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard

TINY = Path(__file__).resolve().parents[1] / "configs" / "sft-tiny-cpu.yaml"
LONG = "This answer goes on and on. " * 60  # longer than the tiny recipe's max_seq_length


def _row(i, finish_reason="stop", response="A full answer."):
    return dict(id=f"r{i}", prompt=f"Question {i}?", guideline_ids=["g"], guideline_texts=["Be kind."],
                response=response, finish_reason=finish_reason, model="m", prompt_tokens=10,
                output_tokens=512, note="")


def _respond(workdir: Path, rows) -> None:
    write_manifest(workdir / "respond", stage="respond", num_shards=1, fingerprint="t")
    write_shard(workdir / "respond", 0, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), "f")


def test_kept_answers_cut_at_max_tokens_are_counted_and_said(tmp_path, caplog):
    from guidealign.core.models import resolve
    from guidealign.sft.data import build_dataset, fit_max_seq_length
    from guidealign.sft.data import tokenize_dataset
    from guidealign.sft.train import prepare_tokenizer

    _respond(tmp_path, [_row(0), _row(1, "length", "An answer that stops mid-sen"),
                        _row(2, "length", LONG), _row(3, "length", "Cut off at the cap and")])
    cfg = load_config(str(TINY), ["sft.keep_finish_reasons=[stop,length]"]).sft
    ds, rep = build_dataset(cfg, tmp_path)
    assert rep.kept == 4 and rep.kept_cut_at_max_tokens == 3
    assert "3 whose answer was cut at respond's max_tokens" in rep.summary()

    # counted over what is trained on: an overlong cut answer dropped, then sft.max_examples
    tok = prepare_tokenizer(cfg, resolve(cfg.base_model))[0]
    cfg.max_examples = 2
    kept = fit_max_seq_length(cfg, tokenize_dataset(tok, ds), tok, rep)
    assert [e["id"] for e in kept] == ["r0", "r1"]
    assert rep.kept_cut_at_max_tokens == 1
    assert any("end where respond's max_tokens cut their answer" in r.getMessage() for r in caplog.records)

    # the default (stop only) drops them, as before: none kept, nothing said
    ds, rep = build_dataset(load_config(str(TINY)).sft, tmp_path)
    assert rep.kept == 1 and rep.kept_cut_at_max_tokens == 0 and rep.dropped == {"truncated": 3}
    assert "max_tokens" not in rep.summary()

