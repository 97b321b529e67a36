"""Retriever training: on held-out prompts, the fine-tuned encoder beats the base one.

The data is planted so that the base encoder is weak: a prompt names an arbitrary code
word plus unrelated filler, and its guideline talks about a topic the code word does not
hint at. Only training on the pairs can teach the link.
"""
from __future__ import annotations

import json

import pytest

from guidealign.config import load_config
from guidealign.retrieval.evaluate import EvalSet, evaluate
from guidealign.retrieval.library import run_library
from synthetic import coded_guideline_rows, write_guideline_shards
from guidealign.retrieval.train import run_train_retriever

import numpy as np


def test_metrics_on_a_known_ranking():
    es = EvalSet(queries=["a", "b"], risky=[True, False], relevant=[{2}, {0, 1}],
                 doc_ids=["x", "y", "z"], docs=["", "", ""], safety=np.array([False, True, False]))
    scores = np.array([[0.9, 0.1, 0.5],    # relevant doc 2 ranks 2nd; top-3 holds safety doc 1
                       [0.2, 0.8, 0.1]])   # relevant docs 1 (1st) and 0 (2nd)
    m = evaluate(es, lambda qs: scores[:len(qs)] if qs[0] == "a" else scores[1:],
                 recall_at=(1, 2), risk_top_k=1, chunk=1)
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["recall@2"] == pytest.approx((1 + 1) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["risk_identification"] == 0.0  # query a's top-1 is doc 0, not a safety guideline


@pytest.mark.slow
def test_fine_tuned_retriever_beats_base_on_heldout(workdir, capsys):
    write_guideline_shards(workdir / "guidelines", coded_guideline_rows(16, 10, seed=1), shard_rows=64)
    cfg = load_config(overrides=[
        "library.heldout_fraction=0.25", "retriever.epochs=3", "retriever.batch_size=32",
        "retriever.learning_rate=0.0001", "retriever.max_seq_length=48", "retriever.threads=1",
    ])
    lib = run_library(cfg, workdir, progress=False)
    assert lib.after_near == 16 and lib.prompts_heldout >= 20
    rep = run_train_retriever(cfg, workdir, progress=False)
    base, tuned, bm25 = (rep.metrics[k] for k in ("base", "fine-tuned", "bm25"))
    print(rep.summary())
    assert base["queries"] == tuned["queries"] == bm25["queries"] == lib.prompts_heldout
    # the planted link is invisible to the base encoder and to BM25 ...
    assert base["recall@1"] < 0.35 and bm25["recall@1"] < 0.35
    # ... and learnt by fine-tuning
    assert tuned["recall@1"] >= base["recall@1"] + 0.3
    assert tuned["mrr"] > base["mrr"] + 0.3
    assert tuned["recall@5"] > base["recall@5"]
    assert tuned["risk_identification"] is not None and tuned["queries"] > 0

    d = workdir / "retriever"
    metrics = json.loads((d / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"base", "fine-tuned", "bm25"}
    assert all(f"recall@{k}" in metrics["systems"]["base"] for k in (1, 3, 5, 10, 20))
    assert (d / "model" / "config.json").exists() or any((d / "model").iterdir())
    done = json.loads((d / "_done.json").read_text())
    assert done["metrics"]["fine-tuned"]["mrr"] == tuned["mrr"]
    assert "fine-tuned" in rep.table and "bm25" in rep.table

    again = run_train_retriever(cfg, workdir, progress=False)
    assert again.skipped and again.metrics == json.loads(json.dumps(rep.metrics))


def test_changing_an_evaluation_setting_re_evaluates_without_retraining(workdir):
    """recall_at, max_eval_queries, risk_top_k and encode_batch_size only change the held-out
    evaluation: changing one used to change the retriever's fingerprint, so the retriever was
    trained again (and the index and every retrieved shard built on it redone). Now the same
    model files stay, with the same fingerprint, and only the metrics are computed again."""
    from guidealign.retrieval.train import model_dir, retriever_dir
    from guidealign.shards.artifact import read_done

    write_guideline_shards(workdir / "guidelines", coded_guideline_rows(8, 6, seed=2), shard_rows=64)
    base = ["library.heldout_fraction=0.25", "retriever.epochs=1", "retriever.batch_size=16",
            "retriever.max_seq_length=32", "retriever.threads=1"]
    cfg = load_config(overrides=base)
    run_library(cfg, workdir, progress=False)
    first = run_train_retriever(cfg, workdir, progress=False)
    assert not first.skipped and "recall@2" not in first.metrics["fine-tuned"]
    done = read_done(retriever_dir(workdir))
    model_files = {k: v for k, v in done["files"].items() if k.startswith("model/")}
    assert model_files

    cfg2 = load_config(overrides=base + ["retriever.recall_at=[1,2]", "retriever.max_eval_queries=3"])
    again = run_train_retriever(cfg2, workdir, progress=False)
    assert again.skipped and again.steps == first.steps
    assert set(again.metrics["fine-tuned"]) >= {"recall@1", "recall@2"}
    assert "recall@3" not in again.metrics["base"] and again.metrics["base"]["queries"] == 3
    done2 = read_done(retriever_dir(workdir))
    assert done2["fingerprint"] == done["fingerprint"]
    assert {k: v for k, v in done2["files"].items() if k.startswith("model/")} == model_files
    metrics = json.loads((retriever_dir(workdir) / "metrics.json").read_text())
    assert metrics["systems"] == json.loads(json.dumps(again.metrics)) and metrics["steps"] == first.steps
    assert done2["files"]["metrics.json"] != done["files"]["metrics.json"]  # checksums kept true
    assert (model_dir(workdir)).is_dir()
    # and the same settings once more: nothing to do at all
    assert run_train_retriever(cfg2, workdir, progress=False).metrics == again.metrics
    # a model file damaged since training is not evaluated, nor its damage recorded as the
    # artifact's checksum (verify passed it from then on)
    weights = next(p for p in model_dir(workdir).rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    cfg3 = load_config(overrides=base + ["retriever.recall_at=[1,3]"])
    with pytest.raises(RuntimeError, match="verify .* --repair"):
        run_train_retriever(cfg3, workdir, progress=False)
    assert read_done(retriever_dir(workdir))["files"] == done2["files"]


def test_a_re_evaluation_killed_midway_leaves_nothing_for_verify_and_runs_again(workdir, monkeypatch):
    """The re-evaluation rewrites metrics.json, whose checksum _done.json lists: killed between
    that and the new _done.json, the run must not hold a checksum that `verify` reports as
    corrupt (its --repair would retrain), and the next run evaluates again."""
    import guidealign.retrieval.train as rt
    from guidealign.shards.artifact import read_done
    from guidealign.shards.verify import verify_run

    write_guideline_shards(workdir / "guidelines", coded_guideline_rows(8, 6, seed=2), shard_rows=64)
    base = ["library.heldout_fraction=0.25", "retriever.epochs=1", "retriever.batch_size=16",
            "retriever.max_seq_length=32", "retriever.threads=1"]
    cfg = load_config(overrides=base)
    run_library(cfg, workdir, progress=False)
    run_train_retriever(cfg, workdir, progress=False)
    first = read_done(rt.retriever_dir(workdir))

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the new _done.json")

    cfg2 = load_config(overrides=base + ["retriever.recall_at=[1,2]"])
    monkeypatch.setattr(rt, "mark_done", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train_retriever(cfg2, workdir, progress=False)
    monkeypatch.undo()
    metrics = json.loads((rt.retriever_dir(workdir) / "metrics.json").read_text())
    assert "recall@2" in metrics["systems"]["fine-tuned"]  # rewritten before the kill
    rep = verify_run(workdir)
    assert not [p for p in rep.problems if p.kind in ("corrupt", "missing")], rep.problems
    left = read_done(rt.retriever_dir(workdir))
    assert left["fingerprint"] == first["fingerprint"] and left["eval_fingerprint"] == first["eval_fingerprint"]
    again = run_train_retriever(cfg2, workdir, progress=False)
    assert again.skipped and "recall@2" in again.metrics["fine-tuned"]
    done = read_done(rt.retriever_dir(workdir))
    assert done["eval_fingerprint"] != first["eval_fingerprint"] and "metrics.json" in done["files"]
    assert not [p for p in verify_run(workdir).problems if p.kind in ("corrupt", "missing")]


def _weights(model_dir) -> dict:
    from safetensors.numpy import load_file

    files = sorted(model_dir.rglob("*.safetensors"))
    assert files, model_dir
    return {f"{f.relative_to(model_dir)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def test_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_model(tmp_path):
    """SIGKILL right after the 2nd checkpoint (step 4 of 12, 6 an epoch), a rerun with another
    save interval killed after its first checkpoint (step 7: in the 2nd epoch, at the new interval,
    not the one in the resumed trainer state), then a rerun to the end: each goes on from the newest
    checkpoint (not from step 0), and the model is the uninterrupted run's, weight for weight
    (optimizer, scheduler, RNG states and the epoch's batch order restored)."""
    import os
    import subprocess
    import sys

    from guidealign.core.checkpoints import newest_checkpoint
    from guidealign.retrieval.library_store import read_library
    from guidealign.retrieval.checkpoints import KILL_AFTER_SAVES_ENV, checkpoint_dir
    from guidealign.retrieval.train import model_dir, retriever_fingerprint
    from guidealign.shards.artifact import read_done

    base = ["library.heldout_fraction=0.25", "retriever.epochs=2", "retriever.batch_size=8",
            "retriever.max_seq_length=32", "retriever.threads=1", "retriever.max_eval_queries=4"]
    cfg = load_config(overrides=base + ["retriever.save_steps=2"])
    rows = coded_guideline_rows(8, 6, seed=2)
    runs = {}
    for name in ("whole", "killed"):
        wd = tmp_path / name
        write_guideline_shards(wd / "guidelines", rows, shard_rows=64)
        run_library(cfg, wd, progress=False)
        runs[name] = wd

    whole = run_train_retriever(cfg, runs["whole"], progress=False)
    assert whole.resumed_from_step is None and whole.steps == 12

    wd = runs["killed"]
    fp = retriever_fingerprint(cfg.retriever, read_library(wd)[1])
    code = ("import sys; from guidealign.config import load_config; "
            "from guidealign.retrieval.train import run_train_retriever; "
            "run_train_retriever(load_config(overrides=sys.argv[2:]), sys.argv[1], progress=False)")

    def killed_run(save_steps: int, kill_after: int) -> None:
        p = subprocess.run([sys.executable, "-c", code, str(wd), *base, f"retriever.save_steps={save_steps}"],
                           capture_output=True, text=True, env={**os.environ, KILL_AFTER_SAVES_ENV: str(kill_after)},
                           timeout=600)
        assert p.returncode == -9, p.stderr[-3000:]
        assert read_done(wd / "retriever") is None  # not finished

    killed_run(2, 2)
    assert sorted(d.name for d in checkpoint_dir(wd, fp).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    killed_run(7, 1)  # resumes at 4; the old interval (2) would save at 6, the new one at 7
    assert newest_checkpoint(checkpoint_dir(wd, fp)).name == "checkpoint-7"

    again = run_train_retriever(load_config(overrides=base + ["retriever.save_steps=7"]), wd, progress=False)
    assert again.resumed_from_step == 7 and again.steps == whole.steps
    assert read_done(wd / "retriever")["resumed_from_step"] == 7
    assert not (wd / ".retriever-checkpoints").exists()  # resume points gone once done
    a, b = _weights(model_dir(runs["whole"])), _weights(model_dir(wd))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]
    # and so are its held-out figures
    assert again.metrics["fine-tuned"] == whole.metrics["fine-tuned"]

    # checkpoints left behind (a run killed between finishing and removing them) go on the next
    # run that finds the retriever current
    stale = checkpoint_dir(wd, fp) / "checkpoint-3"
    stale.mkdir(parents=True)
    assert run_train_retriever(cfg, wd, progress=False).skipped and not (wd / ".retriever-checkpoints").exists()


def test_newest_checkpoint_passes_over_one_cut_off_while_being_saved(tmp_path):
    """The Trainer writes a checkpoint's trainer state last, with a plain write: a folder whose
    state is missing, cut off or of another step is not resumed from (SFT and the retriever)."""
    from guidealign.core.checkpoints import newest_checkpoint

    def ckpt(step, state):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)

    assert newest_checkpoint(tmp_path / "none") is None
    ckpt(2, json.dumps({"global_step": 2}))
    ckpt(4, json.dumps({"global_step": 4}))
    ckpt(6, '{"global_step": 6, "log_hi')   # killed while writing its state
    ckpt(8, None)                           # killed before it
    ckpt(10, json.dumps({"global_step": 3}))  # not this folder's state
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


@pytest.mark.slow
def test_a_retriever_whose_base_is_stored_in_bfloat16_trains_in_float32(workdir, tmp_path):
    """transformers loads a model in its stored dtype: a bf16-stored base trained in bf16, where
    AdamW steps of ~2e-5 round away (R@1 stayed at the base's 0.08 where float32 reached 0.62)."""
    import torch

    from guidealign.retrieval.embed import load_encoder

    bf16 = tmp_path / "minilm-bf16"
    base = load_encoder("embedded:all-minilm-l6-v2", device="cpu")
    base.to(torch.bfloat16)
    base.save(str(bf16))
    assert json.loads((bf16 / "config.json").read_text()).get("dtype") == "bfloat16"
    write_guideline_shards(workdir / "guidelines", coded_guideline_rows(16, 10, seed=1), shard_rows=64)
    cfg = load_config(overrides=[
        f"retriever.base_model={bf16}", "library.heldout_fraction=0.25", "retriever.epochs=2",
        "retriever.batch_size=32", "retriever.max_seq_length=48", "retriever.threads=1"])
    run_library(cfg, workdir, progress=False)
    rep = run_train_retriever(cfg, workdir, progress=False)
    assert rep.metrics["fine-tuned"]["recall@1"] >= rep.metrics["base"]["recall@1"] + 0.3, rep.metrics
    tuned = load_encoder(str(workdir / "retriever" / "model"), device="cpu")
    assert next(tuned.parameters()).dtype == torch.float32
