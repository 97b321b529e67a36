"""Config sections of the retrieval stages (owned by the retrieval package).

Defaults marked "paper" come from Guide-Align (arXiv 2403.11838); the others are ours
and say why they are what they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


# Keys of each section that change only speed and memory, not what the stage writes: its
# fingerprint counts them at their defaults (the generation stages leave the engine's
# performance settings out too), so tuning them on a GPU node rebuilds nothing (the index's
# fingerprint is in every retrieve shard's: before, a new index.batch_size redid retrieve and
# respond). Their last-bit effects on embeddings are those of threads (see "The resume
# contract" in the README).
LIBRARY_PERFORMANCE = ("use_gpu", "batch_size", "threads")
# mini_batch_size only with loss="mnrl", which never reads it: the cached loss runs each
# mini-batch as its own forward pass, with its own dropout masks, so there it changes the model
RETRIEVER_PERFORMANCE = ("threads", "mini_batch_size")
# Retriever settings that neither change the model nor existed when its fingerprint was last
# versioned: left out of it (a run with them keeps the fingerprint it had).
RETRIEVER_RESUME = ("save_steps",)
INDEX_PERFORMANCE = ("use_gpu", "batch_size", "threads")
# Settings the chosen kind (index.kind) or candidate space (library.candidates) never reads:
# they count at their defaults too, so tuning an unused one rebuilds nothing.
INDEX_UNREAD = {"flat": ("nlist", "nprobe", "hnsw_m", "ef_search"), "ivf": ("hnsw_m", "ef_search"),
                "hnsw": ("nlist", "nprobe")}
LIBRARY_UNREAD = {"ngram": ("embed_model",), "model": ("ngram_dim",)}


@dataclass
class LibraryConfig:
    # Input stage (a directory under WORKDIR) holding the guideline shards. Ours.
    src: str = "guidelines"
    # Paper: guidelines whose fuzzy-match ratio (rapidfuzz fuzz.ratio / 100) is >= 0.75 are merged.
    fuzzy_threshold: float = 0.75
    # Candidate space for near-duplicate search. "ngram": hashed character 3-gram vectors (cheap,
    # and fuzz.ratio is itself a character-level measure, so it finds the pairs that ratio confirms);
    # "model": sentence embeddings from `embed_model` (semantic neighbours; slower on CPU), and
    # the n-gram neighbours too, as fuzz.ratio is character-level (typos in every word put a pair
    # far apart in embedding space while its ratio says merge; Stop 57). Ours.
    candidates: Literal["ngram", "model"] = "ngram"
    # Dimension of the hashed n-gram vectors (candidates="ngram"). Ours: 256 keeps 1M vectors at 1 GiB.
    ngram_dim: int = 256
    # Sentence-transformers model for candidates="model": path, Hub id or the embedded MiniLM.
    embed_model: str = "embedded:all-minilm-l6-v2"
    # Nearest neighbours fetched per guideline as merge candidates; a group larger than this is
    # still joined by chains of matched pairs (connected components). Ours: against fuzz.ratio
    # over every pair (`python bench/retrieval.py --only merge`, groups of ~25 rewrites, as the
    # paper's 767k -> 33k), 10 missed 0.5% of the merges of word-level rewrites, 30 none.
    neighbors: int = 30
    # Candidates whose cosine similarity is below this are not sent to rapidfuzz. Ours, a loose
    # pre-filter: typos spread over every word (or stripped accents) keep fuzz.ratio >= 0.75 but
    # break most 3-grams (cosine 0.34-0.5); 0.5 missed 1.5% of such merges in that bench, 0.4
    # none. Very short texts can still fall below it (hashed 3-grams of "no lies" and "no ties",
    # ratio 0.86, share too few n-grams), so for them the merge is best-effort (texts too short
    # for one n-gram are compared with every short text).
    min_cosine: float = 0.4
    # Up to this many unique guidelines the candidate search is exact (flat, quadratic); above it,
    # IVF with 4*sqrt(n) lists. Ours: flat over 40k vectors already takes ~10 s on 2 cores.
    exact_search_max: int = 20_000
    # IVF lists probed per query in the approximate candidate search. Ours.
    nprobe: int = 8
    # Search the candidates on the GPUs (sharded): "auto" when a probe search on them matches
    # the CPU, else on the CPU with the reason logged; true: GPUs or an error; false: CPU
    # (retrieval/index.py). Ours: FAISS GPU wheels lack kernels for some GPUs.
    use_gpu: bool | Literal["auto"] = "auto"
    # Share of prompts whose pairs go to the held-out split (chosen by a hash of the prompt id). Ours.
    heldout_fraction: float = 0.1
    # Rows per library shard. Ours.
    shard_rows: int = 50_000
    # Guideline rows per embedding/featurizing batch (bounds memory). Ours.
    batch_size: int = 256
    # torch threads for candidates="model" (0: leave torch's default). Ours.
    threads: int = 0


@dataclass
class RetrieverConfig:
    # Base bi-encoder: path, Hub id, or the embedded MiniLM.
    base_model: str = "embedded:all-minilm-l6-v2"
    # "mnrl": MultipleNegativesRankingLoss; "cached_mnrl": its cached (GradCache) variant, which
    # allows large batches in little memory.
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl"
    # Mini-batch size of the cached loss (only for loss="cached_mnrl"). Ours.
    mini_batch_size: int = 32
    # Training pairs per batch; each batch's other positives are the in-batch negatives. Ours.
    batch_size: int = 64
    # Passes over the training pairs. Ours.
    epochs: int = 1
    # AdamW learning rate. Ours: the usual sentence-transformers fine-tuning rate.
    learning_rate: float = 2e-5
    # Share of steps with linear warm-up. Ours.
    warmup_ratio: float = 0.1
    # Longest input in tokens (prompts are truncated to it). Ours.
    max_seq_length: int = 128
    # Seed for shuffling and initialisation. Ours.
    seed: int = 0
    # At most this many training prompts per guideline (0: all; "auto": an epoch's number of
    # full batches, ceil(pairs / batch_size), at least 16), chosen by a seeded hash of (prompt,
    # guideline).
    # Ours: two pairs of one guideline never share a batch (the other would be a false in-batch
    # negative), so a guideline serving thousands of prompts (a generic one, merged from many
    # near-duplicates) made an epoch of thousands of batches, most of one pair (no negative,
    # no loss, yet an optimizer step); configs/gpu-paper.yaml sets "auto".
    max_prompts_per_guideline: int | Literal["auto"] = 0
    # The next four only shape the held-out evaluation: changing one re-evaluates the trained
    # retriever without retraining it (the index and retrieved shards stay current).
    # Evaluate on at most this many held-out prompts (0: all). Ours: BM25 is slow on big corpora.
    max_eval_queries: int = 5000
    # Cut-offs of recall@k.
    recall_at: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])
    # Paper: the risk-identification rate counts risky prompts with a safety guideline in the top 3.
    risk_top_k: int = 3
    # Texts per encode batch during evaluation. Ours.
    encode_batch_size: int = 128
    # torch threads (0: leave torch's default). Ours.
    threads: int = 0
    # Save a checkpoint (weights, optimizer, scheduler, RNG states) every this many steps, so a
    # run killed midway resumes from the last one instead of its first step (0: never). The
    # result is the same either way: the key is not in the retriever's fingerprint. Ours.
    save_steps: int = 500


@dataclass
class IndexConfig:
    # Encoder of the library: "retriever" (the model trained by `guidealign train-retriever`), or any
    # sentence-transformers model (path, Hub id, embedded name). Ours.
    model: str = "retriever"
    # "flat" (exact, default: libraries hold tens of thousands of guidelines), "ivf" or "hnsw"
    # for very large ones.
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    # IVF lists (kind="ivf"); 0 picks 4*sqrt(n). Ours, FAISS's usual rule of thumb.
    nlist: int = 0
    # IVF lists probed per query (kind="ivf"). Ours.
    nprobe: int = 16
    # HNSW links per node (kind="hnsw"). Ours.
    hnsw_m: int = 32
    # HNSW search depth (kind="hnsw"). Ours.
    ef_search: int = 128
    # Search on the GPUs (sharded over all of them): "auto" when a probe search on them matches
    # the CPU, else on the CPU with the reason logged; true: GPUs or an error; false: CPU
    # ("auto": FAISS GPU wheels lack kernels for some GPUs, so a probe decides).
    use_gpu: bool | Literal["auto"] = "auto"
    # Texts per encode batch. Ours.
    batch_size: int = 256
    # torch threads (0: leave torch's default). Ours.
    threads: int = 0


@dataclass
class RetrieveConfig:
    # Paper: top 20 candidates, near-duplicates (ratio >= 0.5) dropped, 6 kept.
    top_n: int = 20
    keep: int = 6
    dedup_ratio: float = 0.5
    # What the near-duplicate test compares: false = each guideline's text as the library compared
    # it when merging (ours: two guidelines the library kept apart are not dropped for sharing a
    # title); true = "Title: text", as embedded, which is what the authors' script compares.
    dedup_with_titles: bool = False
    # Prompt set to retrieve for (a dataset under WORKDIR); "" = "prompts-sft" when the config
    # has inputs_sft (the paper: responses for a separate fine-tuning set), else "prompts".
    prompts: str = ""
    # Prompts per encode batch. Ours.
    batch_size: int = 256
    # torch threads (0: leave torch's default). Ours.
    threads: int = 0
