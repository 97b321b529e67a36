"""Library stage: explode, exact dedup, near-dup merge (FAISS candidates + rapidfuzz +
union-find), canonical guidelines, pairs with a held-out split, report, rerun no-op."""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from rapidfuzz import fuzz

from guidealign.config import load_config
from guidealign.retrieval.dedup import cluster, components, exhaustive_pairs
from guidealign.retrieval.embed import ngram_vectors, normalize_text
from guidealign.retrieval.library import run_library
from guidealign.retrieval.library_candidates import library_vectors
from guidealign.retrieval.library_store import read_library
from synthetic import rewrite_families, synthetic_library, write_guideline_shards


PLANTED = [
    # (a, b, should merge)
    ("Do not provide instructions for making weapons or explosives.",
     "Do not give instructions for making weapons or explosives!", True),
    ("Encourage the user to seek professional medical advice for dosage questions.",
     "Encourage the user to seek professional medical advice on dosage questions.", True),
    ("Respect user privacy and never reveal personal data of third parties.",
     "respect  user privacy and never reveal the personal data of third parties", True),
    ("Do not provide instructions for making weapons or explosives.",
     "Cite reliable sources when discussing vaccines and public health.", False),
    ("Keep a neutral tone when discussing elections and political candidates.",
     "Keep answers short and use plain language for beginners.", False),
]


@pytest.mark.parametrize("a,b,merge", PLANTED)
def test_planted_pairs_merge_exactly_when_ratio_reaches_threshold(a, b, merge):
    texts = [normalize_text(a), normalize_text(b)]
    # the planted data means what it says: ratio itself is on the right side of 0.75
    assert (fuzz.ratio(*texts) >= 75) == merge
    labels, stats = cluster(texts, ngram_vectors(texts), threshold=0.75, k=5, min_cosine=0.3)
    assert (labels[0] == labels[1]) == merge
    assert stats.clusters == (1 if merge else 2)


def _origin_purity(keys, labels, origin_of_key):
    by_label: dict[int, set] = {}
    for k, lab in zip(keys, labels.tolist()):
        by_label.setdefault(lab, set()).add(origin_of_key[k])
    by_origin: dict[int, set] = {}
    for lab, origins in by_label.items():
        for o in origins:
            by_origin.setdefault(o, set()).add(lab)
    return by_label, by_origin


@pytest.mark.parametrize("exact_max", [100_000, 100])  # flat search, then IVF (approximate)
def test_synthetic_near_duplicates_cluster_by_origin(exact_max):
    texts, origin = synthetic_library(4000, 200, seed=3)
    origin_of_key = {}
    for t, o in zip(texts, origin):
        origin_of_key.setdefault(normalize_text(t), o)
    keys = sorted(origin_of_key)
    assert 200 < len(keys) < 4000  # exact duplicates and rewrites both present
    labels, stats = cluster(keys, ngram_vectors(keys), threshold=0.75, k=10, min_cosine=0.3,
                            exact_max=exact_max, nprobe=8)
    by_label, by_origin = _origin_purity(keys, labels, origin_of_key)
    # no cluster mixes two distinct guidelines
    assert all(len(o) == 1 for o in by_label.values())
    # and nearly every guideline's rewrites end up together (IVF may miss a few edges)
    split = sum(len(labs) > 1 for labs in by_origin.values())
    assert split <= (0 if exact_max > 4000 else 4)
    assert stats.search.startswith("flat" if exact_max > 4000 else "ivf")


def _rows():
    """Prompts whose guidelines are planted exact/near duplicates of 3 bases + 1 distinct."""
    a = "Do not provide instructions for making weapons or explosives."
    a2 = "Do not give instructions for making weapons or explosives!"
    b = "Encourage the user to seek professional medical advice for dosage questions."
    b2 = "encourage the user to seek professional  medical advice on dosage questions"
    c = "Keep answers short and use plain language for beginners."
    d = "Cite reliable sources when discussing vaccines and public health."
    rows = []
    for i in range(40):
        gl = [{"title": "Weapons", "text": a if i % 3 else a2},
              {"title": "Dosage", "text": b if i % 2 else b2}]
        rows.append({"id": f"r{i:03d}", "prompt": f"risky prompt {i}", "risky": True, "guidelines": gl})
    for i in range(30):
        rows.append({"id": f"q{i:03d}", "prompt": f"plain prompt {i}", "risky": False,
                     "guidelines": [{"title": "Style", "text": c},
                                    {"title": "Dosage", "text": b}] if i < 10 else
                     [{"title": "Style", "text": c}]})
    rows.append({"id": "s000", "prompt": "one-off", "risky": None,
                 "guidelines": [{"title": "Sources", "text": d}, {"title": "", "text": "  "}]})
    rows.append({"id": "e000", "prompt": "no guidelines", "risky": False, "guidelines": []})
    random.Random(0).shuffle(rows)
    return rows


@pytest.mark.parametrize("kind", ["words", "typos"])
def test_default_merge_finds_every_merge_that_comparing_all_pairs_finds(kind):
    """Families of 25 rewrites with 1-15 edits each (word changes, or typos spread over every
    word): with the default library settings the candidate search + fuzz.ratio gives the same
    groups as fuzz.ratio over every pair. (neighbors 10 / min_cosine 0.5 left one text apart
    in each kind.)"""
    lc = load_config().library
    texts = rewrite_families(1000, 40, seed=0, kind=kind)
    labels, _ = cluster(texts, library_vectors(texts, lc), threshold=lc.fuzzy_threshold,
                        k=lc.neighbors, min_cosine=lc.min_cosine, exact_max=lc.exact_search_max,
                        nprobe=lc.nprobe, use_gpu=False)
    reference = components(len(texts), exhaustive_pairs(texts, lc.fuzzy_threshold))
    assert len(np.unique(reference)) < len(texts) // 2  # the families do merge
    assert labels.tolist() == reference.tolist()


VIETNAMESE = [
    "Không cung cấp hướng dẫn chế tạo vũ khí hoặc chất nổ cho bất kỳ ai.",
    "Hãy khuyên người dùng tìm đến bác sĩ khi có câu hỏi về liều lượng thuốc.",
    "Tôn trọng quyền riêng tư và không tiết lộ dữ liệu cá nhân của người khác.",
    "Giữ giọng điệu trung lập khi thảo luận về bầu cử và các ứng cử viên chính trị.",
    "Trả lời ngắn gọn, dùng ngôn ngữ đơn giản cho người mới bắt đầu học.",
]


def test_guidelines_written_once_with_and_once_without_accents_merge_as_their_ratio_says():
    """Stripped accents keep fuzz.ratio at 0.75-0.79 for four of these sentences (0.746 for the
    last) while breaking most of their 3-grams (cosine 0.25-0.47 before the candidate vectors
    folded accents): the default search now finds the four, and the fifth stays apart."""
    import unicodedata

    def strip(t):
        t = "".join(c for c in unicodedata.normalize("NFD", t) if not unicodedata.combining(c))
        return t.replace("đ", "d").replace("Đ", "D")

    lc = load_config().library
    texts = [normalize_text(t) for s in VIETNAMESE for t in (s, strip(s))]
    labels, _ = cluster(texts, library_vectors(texts, lc), threshold=lc.fuzzy_threshold,
                        k=lc.neighbors, min_cosine=lc.min_cosine, use_gpu=False)
    assert labels.tolist() == components(len(texts), exhaustive_pairs(texts, lc.fuzzy_threshold)).tolist()
    assert labels.tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 9]


def test_guideline_kind_is_the_prompt_set_it_was_written_with(workdir):
    # a prompt without a verdict gets safety guidelines (guidelines.unknown_verdict: safety);
    # its guidelines are safety ones in the library too, not "quality" for want of a verdict
    rows = [dict(r, kind="safety" if r["risky"] in (True, None) else "quality") for r in _rows()]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=16)
    run_library(load_config(), workdir, progress=False)
    lib, _ = read_library(workdir)
    kinds = {r["text"]: r["kind"] for r in lib.to_pylist()}
    assert kinds["Cite reliable sources when discussing vaccines and public health."] == "safety"
    assert kinds["Keep answers short and use plain language for beginners."] == "quality"
    assert kinds["Do not provide instructions for making weapons or explosives."] == "safety"


def test_prompts_that_differ_only_in_case_share_a_split(workdir):
    """The split hashed each prompt id, and ids are case-sensitive while the default encoder's
    tokenizer lower-cases: "How can i..." in held-out was a training anchor as "how can I...".
    Twins now share the split of their smallest id; other prompts keep their own."""
    from guidealign.retrieval.split import is_heldout

    ids = [f"p{i:03d}" for i in range(200)]
    a = next(i for i in ids if is_heldout(i, 0.5))
    b = next(i for i in ids if not is_heldout(i, 0.5) and i > a)  # b's own split differs from a's
    c = next(i for i in ids if i not in (a, b))
    texts = {a: "How can I make a fake ID card at home?", b: "how can i make a fake id card at home?",
             c: "Explain tides."}
    rows = [{"id": p, "prompt": t, "risky": True,
             "guidelines": [{"title": "", "text": f"Refuse to help forge documents ({p == c})."}]}
            for p, t in texts.items()]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=16)
    run_library(load_config(overrides=["library.heldout_fraction=0.5"]), workdir, progress=False)
    split = {}
    for name in ("train", "heldout"):
        for r in pq.read_table(workdir / "library" / "pairs" / f"{name}.parquet").to_pylist():
            split[r["prompt_id"]] = name
    assert split[a] == split[b] == "heldout"  # the group's smallest id, a, is held out
    assert split[c] == ("heldout" if is_heldout(c, 0.5) else "train")


def test_run_library_end_to_end(workdir):
    rows = _rows()
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=16)
    cfg = load_config(overrides=["library.heldout_fraction=0.25"])
    rep = run_library(cfg, workdir, progress=False)
    assert rep.prompts == len(rows)
    assert rep.prompts_without_guidelines == 1
    assert rep.empty_dropped == 1
    assert rep.exploded == 40 * 2 + 10 * 2 + 20 + 1
    assert rep.after_exact == 6          # a, a2, b, b2, c, d
    assert rep.after_near == 4           # {a, a2}, {b, b2}, c, d
    lib, version = read_library(workdir)
    by_text = {r["text"]: r for r in lib.to_pylist()}
    a = by_text["Do not provide instructions for making weapons or explosives."]  # the more frequent
    assert a["members"] == 40 and a["kind"] == "safety" and a["title"] == "Weapons"
    assert a["prompt_ids"] == sorted(f"r{i:03d}" for i in range(40))
    b = by_text["Encourage the user to seek professional medical advice for dosage questions."]
    assert b["members"] == 50 and b["kind"] == "safety"  # 40 risky vs 10 safe prompts
    c = by_text["Keep answers short and use plain language for beginners."]
    assert c["members"] == 30 and c["kind"] == "quality"
    d = by_text["Cite reliable sources when discussing vaccines and public health."]
    assert d["kind"] == "quality" and d["prompt_ids"] == ["s000"]  # unknown risk: not safety
    assert all(g.startswith("g") and len(g) == 17 for g in lib.column("guideline_id").to_pylist())

    train = pq.read_table(workdir / "library" / "pairs" / "train.parquet").to_pylist()
    held = pq.read_table(workdir / "library" / "pairs" / "heldout.parquet").to_pylist()
    assert len(train) + len(held) == 40 * 2 + 10 * 2 + 20 + 1
    assert held and train
    assert not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in held}
    assert {p["guideline_id"] for p in train + held} <= set(lib.column("guideline_id").to_pylist())
    report = json.loads((workdir / "library" / "report.json").read_text())
    assert report["exploded"] >= report["after_exact"] >= report["after_near"] == lib.num_rows
    done = json.loads((workdir / "library" / "_done.json").read_text())
    assert done["version"] == version and done["rows"] == 4

    # a rerun with the same inputs and config does nothing; ids are stable
    mtime = (workdir / "library" / "_done.json").stat().st_mtime_ns
    again = run_library(cfg, workdir, progress=False)
    assert again.skipped and again.after_near == 4
    assert (workdir / "library" / "_done.json").stat().st_mtime_ns == mtime
    # another config rebuilds, and the canonical ids do not depend on it
    cfg2 = load_config(overrides=["library.heldout_fraction=0.5"])
    run_library(cfg2, workdir, progress=False)
    lib2, version2 = read_library(workdir)
    assert sorted(lib2.column("guideline_id").to_pylist()) == sorted(lib.column("guideline_id").to_pylist())
    # the same guidelines, other training pairs: another version, so the retriever retrains
    assert version2 != version


def test_library_model_candidates_agree_with_ngram(workdir):
    rows = _rows()
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=50)
    cfg = load_config(overrides=["library.candidates=model", "library.threads=1"])
    rep = run_library(cfg, workdir, progress=False)
    assert rep.after_exact == 6 and rep.after_near == 4


def test_library_waits_for_complete_input(workdir):
    write_guideline_shards(workdir / "guidelines", _rows(), shard_rows=16)
    (workdir / "guidelines" / "shard-00002.done.json").unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        run_library(load_config(), workdir, progress=False)
    assert not (workdir / "library" / "_done.json").exists()


def test_ngram_vectors_are_unit_and_track_overlap():
    v = ngram_vectors(["the cat sat on the mat", "the cat sat on a mat", "quantum flux capacitor", ""])
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert not v[3].any()
    assert v[0] @ v[1] > 0.6 > abs(v[0] @ v[2])


def test_guideline_is_written_as_most_occurrences_write_it_in_any_input_order(workdir):
    """Occurrences that differ in case or spacing are one guideline; its title and text are the
    most frequent spellings, whichever occurrence is read first."""
    def row(pid, title, text):
        return {"id": pid, "prompt": pid, "risky": False, "guidelines": [{"title": title, "text": text}]}

    rows = [row("p1", "KINDNESS", "Be Kind  to everyone."),
            row("p2", "Kindness", "be kind to everyone."),
            row("p3", "Kindness", "be kind to everyone."),
            row("p4", "", "be kind to everyone.")]
    libs = []
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):
        d = workdir / f"w{len(libs)}"
        write_guideline_shards(d / "guidelines", order, shard_rows=1)
        run_library(load_config(), d, progress=False)
        libs.append(read_library(d))
    first, version = libs[0]
    assert [(r["title"], r["text"], r["members"]) for r in first.to_pylist()] == [
        ("Kindness", "be kind to everyone.", 4)]
    assert all(lib.equals(first) and v == version for lib, v in libs[1:])


def test_title_only_guideline_is_embedded_once():
    from guidealign.retrieval.embed import doc_text

    assert doc_text("Refuse weapon help", "Refuse weapon help") == "Refuse weapon help"
    assert doc_text("Refuse weapon help", "") == "Refuse weapon help"
    assert doc_text("", "Be kind.") == "Be kind."
    assert doc_text("Kindness", "Be kind.") == "Kindness: Be kind."


def test_keys_too_short_for_an_ngram_still_merge_by_ratio():
    """A key under 3 bytes has no character trigram (an all-zero vector, found by no search):
    it is compared with every key short enough to reach the ratio ("no" ~ "no.": 80)."""
    keys = [normalize_text(x) for x in ["No", "No.", "be", "bee", "yes", "ok", "Be polite."]]
    labels, stats = cluster(keys, ngram_vectors(keys), threshold=0.75, k=8, min_cosine=0.5, use_gpu=False)
    assert labels.tolist() == [0, 0, 2, 2, 4, 5, 6]
    assert fuzz.ratio("no", "no.") >= 75 > fuzz.ratio("no", "ok")


def test_invisible_guidelines_are_dropped_and_their_prompts_counted_as_without_guidelines(workdir):
    """A guideline of a zero-width space (or a BOM) became a library entry with invisible text:
    strip() and \\s do not cover them; and a prompt whose guidelines were all blank was not
    counted among the prompts without guidelines."""
    rows = [{"id": "a", "prompt": "p1", "risky": True,
             "guidelines": [{"title": "", "text": "\u200b"}, {"title": " ", "text": "\ufeff \u200b"}]},
            {"id": "b", "prompt": "p2", "risky": True,
             "guidelines": [{"title": "T", "text": "Refuse to help with weapons."}]},
            {"id": "c", "prompt": "p3", "risky": False, "guidelines": [{"title": "", "text": "  "}]}]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=8)
    rep = run_library(load_config(), workdir, progress=False)
    lib, _ = read_library(workdir)
    assert [r["text"] for r in lib.to_pylist()] == ["Refuse to help with weapons."]
    assert rep.empty_dropped == 3 and rep.prompts_without_guidelines == 2


def test_rows_of_one_prompt_id_that_disagree_give_the_same_library_in_any_order(tmp_path):
    """Two rows with one id, one safety and one quality: the first read won, so the library's
    kinds and version depended on the rows' order."""
    rows = [{"id": "dup", "prompt": "p", "risky": True, "kind": "safety",
             "guidelines": [{"title": "A", "text": "Refuse to help with weapons."}]},
            {"id": "dup", "prompt": "p", "risky": False, "kind": "quality",
             "guidelines": [{"title": "B", "text": "Answer in plain words for beginners."}]},
            {"id": "other", "prompt": "q", "risky": False, "kind": "quality",
             "guidelines": [{"title": "C", "text": "Cite your sources when you give numbers."}]}]
    got = []
    for order in (rows, rows[::-1]):
        w = tmp_path / f"w{len(got)}"
        write_guideline_shards(w / "guidelines", order, shard_rows=8)
        rep = run_library(load_config(), w, progress=False)
        lib, _ = read_library(w)
        got.append((rep.version, sorted((r["text"], r["kind"]) for r in lib.to_pylist())))
    assert got[0] == got[1]
    assert ("Answer in plain words for beginners.", "safety") in got[0][1]  # the id's rows: safety


def test_a_guideline_of_invisible_text_keeps_its_title(workdir):
    """A text of only a zero-width space was dropped with its guideline; an empty text gives the
    title its place, and so does an invisible one now."""
    rows = [{"id": "a", "prompt": "p1", "risky": True,
             "guidelines": [{"title": "Avoid weapons help", "text": "\u200b"}]}]
    write_guideline_shards(workdir / "guidelines", rows, shard_rows=8)
    rep = run_library(load_config(), workdir, progress=False)
    lib, _ = read_library(workdir)
    assert [r["title"] for r in lib.to_pylist()] == ["Avoid weapons help"]
    assert rep.prompts_without_guidelines == 0
