"""``guidealign train-retriever``: fine-tune a bi-encoder on (prompt, guideline) pairs.

In-batch negatives (MultipleNegativesRankingLoss, or its cached variant for big batches)
with the no-duplicates batch sampler: a prompt has several positive guidelines and a
guideline serves many prompts, so without it a batch would hold a text twice and treat
one copy as the other's negative.

Training saves a checkpoint every ``retriever.save_steps`` steps under
``WORKDIR/.retriever-checkpoints/<fingerprint>-<versions>/`` (``retrieval.checkpoints``); a run
killed midway resumes from the newest complete one (weights, optimizer, scheduler, RNG states
and the epoch's batch order restored, so the model comes out as an uninterrupted run's), and the
folder is removed once the retriever is done.

Then the base encoder, the fine-tuned one and BM25 are evaluated on the held-out prompts
(:mod:`retrieval.evaluate`). Output ``WORKDIR/retriever/``: ``model/``, ``metrics.json``,
then ``_done.json`` last. The evaluation-only settings (``EVAL_KEYS``) are not part of the
retriever's fingerprint: changing one re-evaluates the trained retriever (``metrics.json`` and
``_done.json`` rewritten) without retraining it, so the index and the retrieved guidelines built
on it stay current.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from guidealign.config.retrieval import RETRIEVER_PERFORMANCE, RETRIEVER_RESUME
from guidealign.core.checkpoints import checkpoint_step
from guidealign.retrieval.checkpoints import (PicklableSampler, checkpoint_callback, checkpoint_dir,
                                              remove_checkpoints, resume_point)
from guidealign.retrieval.sampler import no_false_negatives_sampler
from guidealign.core.threads import set_threads
from guidealign.shards.artifact import DONE, build_dir, is_current, mark_done, read_done
from guidealign.shards import fingerprint, write_json_atomic
from guidealign.shards.fingerprint import at_defaults

log = logging.getLogger(__name__)
STAGE = "retriever"


@dataclass
class RetrieverReport:
    train_pairs: int = 0
    steps: int = 0
    metrics: dict = field(default_factory=dict)
    table: str = ""
    seconds: float = 0.0
    skipped: bool = False
    resumed_from_step: int | None = None  # the checkpoint a crashed run's training went on from

    def summary(self) -> str:
        head = "retriever: up to date" if self.skipped else \
            f"retriever: trained on {self.train_pairs} pairs ({self.steps} steps, {self.seconds:.0f}s" + \
            (f", resumed at step {self.resumed_from_step})" if self.resumed_from_step else ")")
        return head + ("\n" + self.table if self.table else "")


def retriever_dir(workdir: str | Path) -> Path:
    return Path(workdir) / STAGE


def model_dir(workdir: str | Path) -> Path:
    return retriever_dir(workdir) / "model"


# retriever settings that only change the evaluation, not the trained model
EVAL_KEYS = ("max_eval_queries", "recall_at", "risk_top_k", "encode_batch_size")


def weights_digest(done: dict | None) -> str | None:
    """A digest of a trained retriever's model files (their sha256s in its ``_done.json``): what
    tells apart two trainings under one fingerprint (training is not bit-reproducible on a GPU;
    a repair retrains). None for a ``_done.json`` without checksums."""
    files = (done or {}).get("files") or {}
    model = {k: v.get("sha256") for k, v in files.items() if k.startswith("model/") and isinstance(v, dict)}
    if not model:
        return None
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


def retriever_fingerprint(rc, library_version: str) -> str:
    """The fingerprint of the retriever trained with ``rc`` on that library version (any rank
    computes it: the index stage accepts only the retriever of the current config and library).
    The evaluation-only settings are left out (``eval_fingerprint``)."""
    # v2: batches without false in-batch negatives (no_false_negatives_sampler); v3: every
    # pair trained on each epoch (the sampler's length is its real number of batches); v4:
    # without the evaluation-only settings; the performance ones count at their defaults
    # (RETRIEVER_PERFORMANCE)
    perf = RETRIEVER_PERFORMANCE if rc.loss == "mnrl" else tuple(k for k in RETRIEVER_PERFORMANCE
                                                                  if k != "mini_batch_size")
    train = {k: v for k, v in at_defaults(rc, perf).items() if k not in EVAL_KEYS + RETRIEVER_RESUME}
    if not train.get("max_prompts_per_guideline"):  # 0, no cap: the fingerprint from before the key
        train.pop("max_prompts_per_guideline", None)
        return fingerprint("retriever-v4", train, library_version)
    # v5, with a cap only: a prompt's guidelines whose pairs the cap left out are no in-batch
    # negatives of it either (before, 64% of the capped pairs of a skewed set had one)
    return fingerprint("retriever-v5", train, library_version)


AUTO_CAP_MIN = 16


def training_pairs(train: pa.Table, doc_of: dict, rc) -> tuple[list[str], list[str], dict[str, set[str]]]:
    """(anchors, positives, every guideline text of each anchor) of the training pairs
    (``prompt``, ``prompt_id``, ``guideline_id`` columns), capped per guideline
    (``retriever.max_prompts_per_guideline``). The third counts the capped pairs too: a
    prompt's guideline whose pair the cap left out must not be an in-batch negative of it; and
    it counts those of the prompt's twins (texts that differ only in case, width or spacing:
    ``normalize_text``, as the split groups them): the encoder's tokenizer may lower-case, so
    "How do I..." and "how do i..." are one query to it, and a guideline of one is no negative
    of the other (for prompts without twins the sets, and so the batches, are as before)."""
    from guidealign.retrieval.embed import normalize_text

    prompts, gids = train.column("prompt").to_pylist(), train.column("guideline_id").to_pylist()
    twin_of = {a: normalize_text(a) for a in set(prompts)}  # (once per prompt, not per pair)
    of_twins: dict[str, set[str]] = {}
    for a, g in zip(prompts, gids):
        of_twins.setdefault(twin_of[a], set()).add(doc_of[g])
    positives_of = {a: of_twins[k] for a, k in twin_of.items()}
    keep, cap = capped_pairs(train.column("prompt_id").to_pylist(), gids, rc.max_prompts_per_guideline,
                             rc.batch_size, rc.seed)
    if len(keep) < len(prompts):
        log.info("retriever: %d of %d training pairs left out, at most %d prompts per guideline "
                 "(retriever.max_prompts_per_guideline)", len(prompts) - len(keep), len(prompts), cap)
    return [prompts[i] for i in keep], [doc_of[gids[i]] for i in keep], positives_of


def capped_pairs(prompt_ids: list[str], guideline_ids: list[str], cap: int | str, batch_size: int,
                 seed: int) -> tuple[list[int], int]:
    """(indices of the training pairs kept, in their order; the cap taken): at most ``cap``
    pairs per guideline ("auto": an epoch's full batches, ceil(pairs / batch_size), and at least
    16, so that small sets keep their pairs; 0: all),
    those with the smallest seeded hash of (prompt id, guideline id), so the choice depends on
    neither the read order nor the other pairs."""
    n = len(prompt_ids)
    limit = max(-(-n // max(1, batch_size)), AUTO_CAP_MIN) if cap == "auto" else int(cap)
    if limit <= 0:
        return list(range(n)), 0
    by_g: dict[str, list[int]] = {}
    for i, g in enumerate(guideline_ids):
        by_g.setdefault(g, []).append(i)
    drop: set[int] = set()
    for g, idx in by_g.items():
        if len(idx) > limit:
            def rank(i, g=g):
                return hashlib.blake2b(f"{seed}\0{prompt_ids[i]}\0{g}".encode(), digest_size=8).digest()
            drop.update(sorted(idx, key=rank)[limit:])
    return [i for i in range(n) if i not in drop], limit


def eval_fingerprint(rc) -> str:
    """The fingerprint of the evaluation settings the metrics were computed with."""
    # v2: held-out prompts with a training twin (the same words) left out: a retriever trained
    # before is evaluated again, not retrained
    return fingerprint("retriever-eval-v2", {k: getattr(rc, k) for k in EVAL_KEYS})


def stale_reason(rc, done: dict, library_version: str) -> str | None:
    """What makes the retriever of ``done`` (its ``_done.json``) another than the one rank 0
    leaves with ``rc`` on that library version, or None when it is that one."""
    if done.get("fingerprint") != retriever_fingerprint(rc, library_version):
        if done.get("library_version") != library_version:
            return (f"trained on another library than this run's: version {done.get('library_version')}, "
                    f"this run's is {library_version}; rank 0 trains it again")
        return "trained with another retriever config than this run's: rank 0 trains it again"
    if done.get("eval_fingerprint") != eval_fingerprint(rc):
        return "evaluated with other evaluation settings than this run's: rank 0 evaluates it again"
    return None


def _train(model, train_ds, rc, out: Path, progress: bool, sampler, resume: Path | None = None) -> int:
    """Train ``model`` in place; checkpoints every ``rc.save_steps`` steps go to ``out``, and
    ``resume`` (a checkpoint there) picks training up where it was saved."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)

    from guidealign.core.distenv import one_device, single_process

    single_process("train-retriever")  # torchrun-style variables would start a process group
    if rc.loss == "mnrl":
        loss = MultipleNegativesRankingLoss(model)
    elif rc.loss == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=rc.mini_batch_size)
    else:
        raise ValueError(f"retriever.loss must be 'mnrl' or 'cached_mnrl', not {rc.loss!r}")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        num_train_epochs=rc.epochs,
        per_device_train_batch_size=rc.batch_size,
        learning_rate=rc.learning_rate,
        warmup_steps=rc.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        seed=rc.seed,
        data_seed=rc.seed,
        batch_sampler=PicklableSampler(sampler),
        save_strategy="steps" if rc.save_steps > 0 else "no",
        save_steps=rc.save_steps if rc.save_steps > 0 else 500,
        save_total_limit=2,  # the newest, and the one before while the newest is being written
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    one_device(args)  # no DataParallel over every visible GPU (guidealign/distenv.py)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_ds, loss=loss,
                                         callbacks=[checkpoint_callback()])
    if resume is not None:
        log.info("retriever: resuming training from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return int(result.global_step)


def run_train_retriever(cfg, workdir: str | Path, *, rank: int = 0, world_size: int = 1,
                        progress: bool = True) -> RetrieverReport:
    from guidealign.retrieval.embed import doc_text, load_encoder
    from guidealign.retrieval.evaluate import build_eval_set
    from guidealign.retrieval.library_store import library_dir, read_library, wait_library

    rc = cfg.retriever
    workdir = Path(workdir)
    dst = retriever_dir(workdir)
    lib = library_dir(workdir)
    # the other ranks wait for the retriever that rank 0 trains (or re-evaluates) now, not any
    # complete one: in a rerun on a new library or config rank 0 is retraining the previous one
    version = wait_library(cfg, workdir, dst, rank, world_size,
                           stale=lambda done, v: stale_reason(rc, done, v))
    if version is None:
        return RetrieverReport(skipped=True)
    fp, efp = retriever_fingerprint(rc, version), eval_fingerprint(rc)
    if is_current(dst, fp):
        remove_checkpoints(workdir)  # left by a run killed after it finished, or by another config
        done = read_done(dst)
        if done.get("eval_fingerprint") != efp:  # evaluation settings changed: the model stands
            done = _reevaluate(rc, workdir, done, efp)
        return RetrieverReport(train_pairs=done.get("train_pairs", 0), steps=done.get("steps", 0),
                               metrics=done.get("metrics", {}), table=done.get("table", ""),
                               skipped=True)

    t0 = time.perf_counter()
    set_threads(rc.threads)
    library, _ = read_library(workdir)
    train = pq.read_table(lib / "pairs" / "train.parquet")
    heldout = pq.read_table(lib / "pairs" / "heldout.parquet")
    if train.num_rows == 0:
        raise RuntimeError(f"{lib}/pairs/train.parquet holds no pairs: nothing to train on ({_no_pairs_why(lib)})")
    doc_of = {g: doc_text(t, x) for g, t, x in zip(library.column("guideline_id").to_pylist(),
                                                    library.column("title").to_pylist(),
                                                    library.column("text").to_pylist())}
    anchors, positives, positives_of = training_pairs(train, doc_of, rc)
    capped, n_pairs = train.num_rows - len(anchors), len(anchors)
    # in-batch negatives need a batch of two pairs with other prompts and other guidelines;
    # without one, every batch holds a single pair, the loss is 0 at every step and the
    # "fine-tuned" encoder would be the base one, saved and evaluated as if trained
    if len(set(anchors)) < 2 or len(set(positives)) < 2:
        raise RuntimeError(
            f"{lib}/pairs/train.parquet holds {n_pairs} pair(s) with {len(set(anchors))} distinct "
            f"prompt(s) and {len(set(positives))} distinct guideline(s): in-batch-negative training "
            "(MultipleNegativesRankingLoss) needs at least 2 of each, or it learns nothing")
    from datasets import Dataset

    train_ds = Dataset.from_dict({"anchor": anchors, "positive": positives})
    # the same check for the batches themselves: two prompts that share all their guidelines
    # pass the one above, yet no two of their pairs may share a batch (each pair's guideline
    # is the other prompt's too), so every batch would again hold a single pair
    sampler = no_false_negatives_sampler(positives_of)
    probe = sampler(train_ds, batch_size=rc.batch_size, drop_last=False, seed=rc.seed)
    sizes = [len(b) for b in probe._pass(0)]
    full = -(-len(anchors) // rc.batch_size)
    if len(sizes) > 2 * full and len(sizes) > full + 10:
        log.warning("retriever: an epoch takes %d batches where %d full ones would hold its %d pairs (%d of "
                    "one pair: no in-batch negative, yet an optimizer step): some guidelines serve more "
                    "prompts than an epoch has batches; set retriever.max_prompts_per_guideline: auto",
                    len(sizes), full, len(anchors), sum(x == 1 for x in sizes))
    if max(sizes, default=0) < 2:
        raise RuntimeError(
            f"{lib}/pairs/train.parquet: no two training pairs can share a batch (retriever.batch_size="
            f"{rc.batch_size}; a pair's guideline may not be a guideline of another prompt in its batch), so "
            "every batch holds one pair and in-batch-negative training (MultipleNegativesRankingLoss) "
            "learns nothing")
    del probe

    model = load_encoder(rc.base_model, max_seq_length=rc.max_seq_length, float32=True)
    es = build_eval_set(library, heldout, rc.max_eval_queries, train)
    base = _evaluate(rc, es, base=model)  # before training changes the model
    ckpt_dir = checkpoint_dir(workdir, fp)
    resume = resume_point(ckpt_dir)
    resumed_at = checkpoint_step(resume) if resume is not None else None  # (rotated away later)
    with build_dir(dst) as tmp:
        steps = _train(model, train_ds, rc, ckpt_dir, progress, sampler, resume)
        model.save(str(tmp / "model"))
        model.eval()
        results = {**base, **_evaluate(rc, es, tuned=model)}
        table = _table(results, rc)
        seconds = time.perf_counter() - t0
        metrics = {"systems": results, "train_pairs": n_pairs, "pairs_capped": capped, "steps": steps,
                   "heldout_twins_left_out": es.twins_left_out,
                   "library_version": version, "base_model": rc.base_model, "loss": rc.loss,
                   "seconds": round(seconds, 2)}
        write_json_atomic(tmp / "metrics.json", json.dumps(metrics, indent=1))
    mark_done(dst, fingerprint=fp, rows=n_pairs, seconds=seconds, metrics=results,
              train_pairs=n_pairs, pairs_capped=capped, steps=steps, library_version=version, table=table,
              eval_fingerprint=efp, base_model=rc.base_model, heldout_twins_left_out=es.twins_left_out,
              resumed_from_step=resumed_at)
    remove_checkpoints(workdir)  # finished: resume points are not needed
    rep = RetrieverReport(train_pairs=n_pairs, steps=steps, metrics=results, table=table,
                          seconds=seconds, resumed_from_step=resumed_at)
    log.info(rep.summary())
    return rep


def _no_pairs_why(lib: Path) -> str:
    """Where the library's prompts went, from its report: held out, without text, without guidelines."""
    m = (read_done(lib) or {}).get("metrics", {})
    return (f"of its {m.get('prompts', '?')} prompts, {m.get('prompts_heldout', '?')} are held out "
            f"(library.heldout_fraction), {m.get('prompts_without_text', '?')} have no text (null or blank) "
            f"and {m.get('prompts_without_guidelines', '?')} no guideline: see {lib}/report.json")


def _evaluate(rc, es, *, base=None, tuned=None) -> dict[str, dict]:
    """Held-out metrics (on the eval set ``es``) of the base encoder (``base``), or of the
    fine-tuned one and BM25 (``tuned``); {} when there are no held-out prompts."""
    from guidealign.retrieval.evaluate import bm25_scorer, dense_scorer, evaluate

    if not es.queries:
        return {}
    kw = {"recall_at": rc.recall_at, "risk_top_k": rc.risk_top_k}
    if base is not None:
        return {"base": evaluate(es, dense_scorer(base, es.docs, rc.encode_batch_size), **kw)}
    return {"fine-tuned": evaluate(es, dense_scorer(tuned, es.docs, rc.encode_batch_size), **kw),
            "bm25": evaluate(es, bm25_scorer(es.docs), **kw)}


def _table(results: dict, rc) -> str:
    from guidealign.retrieval.evaluate import render_table

    return render_table(results, rc.recall_at) if results else "(no held-out prompts: not evaluated)"


def _reevaluate(rc, workdir: Path, done: dict, efp: str) -> dict:
    """Evaluate the trained retriever again with the current evaluation settings: its files
    stay as they are, ``metrics.json`` and ``_done.json`` (same fingerprint) get the new figures."""
    from guidealign.retrieval.embed import load_encoder
    from guidealign.retrieval.evaluate import build_eval_set
    from guidealign.retrieval.library_store import library_dir, read_library

    from guidealign.shards.artifact_files import check_files, file_checksums

    t0 = time.perf_counter()
    dst = retriever_dir(workdir)
    # the model's files as training left them: a file damaged since is not evaluated, nor its
    # damage recorded as the artifact's checksum (verify would pass it from then on)
    kept = {k: v for k, v in (done.get("files") or {}).items() if k != "metrics.json"}
    damaged = check_files(dst, kept)
    if damaged:
        raise RuntimeError(
            f"{dst}: {', '.join(f'{rel} {kind}' for kind, rel, _ in damaged)} since the retriever was trained: "
            f"run `guidealign verify {workdir} --repair` (the next run trains it again)")
    set_threads(rc.threads)
    library, _ = read_library(workdir)
    heldout = pq.read_table(library_dir(workdir) / "pairs" / "heldout.parquet")
    train = pq.read_table(library_dir(workdir) / "pairs" / "train.parquet", columns=["prompt"])
    base = load_encoder(rc.base_model, max_seq_length=rc.max_seq_length, float32=True)  # as first evaluated
    tuned = load_encoder(str(model_dir(workdir)), max_seq_length=rc.max_seq_length)
    es = build_eval_set(library, heldout, rc.max_eval_queries, train)
    results = {**_evaluate(rc, es, base=base), **_evaluate(rc, es, tuned=tuned)}
    metrics_path = dst / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError):
        metrics = {}
    metrics["systems"], metrics["heldout_twins_left_out"] = results, es.twins_left_out
    # _done.json lists metrics.json's checksum: unlisted first (the old evaluation fingerprint
    # kept, so a rerun evaluates again), so that a kill before the new _done.json is written
    # leaves no checksum that `verify` would report (and --repair retrain for)
    write_json_atomic(dst / DONE, dict(done, files=kept))
    write_json_atomic(metrics_path, json.dumps(metrics, indent=1))
    extra = {k: v for k, v in done.items() if k not in ("fingerprint", "rows", "seconds", "created",
                                                       "threads", "files")}
    # the other files' checksums as training recorded them; metrics.json's taken now
    extra.update(metrics=results, table=_table(results, rc), eval_fingerprint=efp,
                 heldout_twins_left_out=es.twins_left_out,
                 files={**kept, **file_checksums(dst, exclude=(DONE, *{k.split("/")[0] for k in kept}))})
    log.info("retriever: re-evaluated with the new evaluation settings in %.0fs (not retrained)",
             time.perf_counter() - t0)
    return mark_done(dst, fingerprint=done["fingerprint"], rows=done.get("rows", 0),
                     seconds=done.get("seconds", 0.0), **extra)
