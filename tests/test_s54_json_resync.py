"""Where a JSON item that does not read ends, as the review of the Stop 54 fixes found it: an
item whose brackets close is cut there, quotes inside it or not (its nested objects were kept as
rows); the next item after one that does not close must be followed by the rest of the array,
however long the bad item's own list of objects (past 64 KiB its objects were rows), and text
after the array, or a bad item in another split, does not make every item after the bad one
part of it; whether JSON Lines follow a first line does not depend on the read size; a file is
said truncated only when it ends there; many bad items cost time in proportion to the file.
And, as a third review found of the second round: an item whose brackets close is never
re-cut by the next-item search (bad items one after another were merged, a good item over the
search's window was made rows of), the items after a bad one are never swallowed, and bad items
one after another are each tried against a bounded number of next objects."""
from __future__ import annotations

import json

import pytest

from guidealign.ingest import jsonarray
from guidealign.ingest.jsonarray import read_json


def _read(tmp_path, text: str, chunk: int | None = None, monkeypatch=None):
    f = tmp_path / "in.json"
    f.write_text(text)
    if chunk is not None:
        monkeypatch.setattr(jsonarray, "_JSON_CHUNK", chunk)
    rows = list(read_json(f))
    kept = [(row, rec.get("prompt", rec.get("text"))) for row, rec, why in rows if why is None]
    bad = [(row, (rec or {}).get("_raw"), why) for row, rec, why in rows if why is not None]
    return kept, bad


def _array(*items: str) -> str:
    return "[" + ",\n ".join(items) + "]"


QS = [json.dumps({"prompt": f"q{i}"}) for i in range(5)]


@pytest.mark.parametrize("bad", [
    # a chat export that does not escape quotes: the brackets close
    '{"prompt": "Chat", "turns": [{"text": "He said "hi" to me"}, {"text": "What next?"}, '
    '{"text": "She said "bye" after"}]}',
    # JSON quoted inside a prompt without escaping
    '{"prompt": "Merge {"id": 1}, {"text": "hello"}, and {"id": 3} into one object"}',
])
def test_an_item_whose_brackets_close_is_quarantined_whole(tmp_path, bad):
    kept, quarantined = _read(tmp_path, _array(QS[0], bad, *QS[1:]))
    assert kept == [(1, "q0")] + [(i + 2, f"q{i}") for i in range(1, 5)]
    assert [(row, raw) for row, raw, _ in quarantined] == [(2, bad)]


def test_a_long_list_of_objects_in_a_bad_item_stays_in_it(tmp_path):
    turns = ", ".join(json.dumps({"text": f"turn {i} " + "x" * 60}) for i in range(1200))  # ~90 KB
    bad = '{"prompt": "a, "turns": [' + turns + '], "n": 1}'
    kept, quarantined = _read(tmp_path, _array(bad, *QS))
    assert kept == [(i + 2, f"q{i}") for i in range(5)]
    assert [(row, raw) for row, raw, _ in quarantined] == [(1, bad)]


@pytest.mark.parametrize("after", ["\n;\n", '\n[{"prompt": "z"}]\n'])
def test_text_after_the_array_does_not_join_the_items_to_a_bad_one(tmp_path, after):
    bad = '{"prompt": "a", "n": 1'  # its '}' left out
    kept, quarantined = _read(tmp_path, _array(bad, *QS) + after)
    assert kept == [(i + 2, f"q{i}") for i in range(5)]
    assert [(row, raw) for row, raw, _ in quarantined[:1]] == [(1, bad)]
    assert [why.startswith("more text after the JSON value ends") for row, _, why in quarantined[1:]] == [True]


def test_a_bad_item_in_each_split_is_quarantined_alone(tmp_path):
    text = ('{"train": [{"prompt": "a", "n": 1, {"prompt": "q1"}, {"prompt": "q2"}], '
            '"test": [{"prompt": "t1"}, {"prompt": "b", "m": 2, {"prompt": "t2"}]}')
    kept, quarantined = _read(tmp_path, text)
    assert [p for _, p in kept] == ["q1", "q2", "t1", "t2"]
    assert [raw for _, raw, _ in quarantined] == ['{"prompt": "a", "n": 1', '{"prompt": "b", "m": 2']


@pytest.mark.parametrize("chunk", [1 << 22, 4096, 100, 7])
def test_json_lines_after_a_first_line_do_not_depend_on_the_read_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(jsonarray, "LOOKAHEAD", 1000)  # a second line longer than the look
    text = "\n".join(json.dumps({"prompt": p}) for p in ["a", "x" * 1500, "b"]) + "\n"
    kept, quarantined = _read(tmp_path, text, chunk, monkeypatch)
    assert ([(row, p[:1]) for row, p in kept], quarantined) == ([(1, "a"), (2, "x"), (3, "b")], [])


def test_a_file_is_said_truncated_only_where_it_ends(tmp_path):
    """Reading ahead past a bad item reached the file's end, and then a broken key further on was
    said to be a cut-off file."""
    text = '{"data": [{"prompt": "a",}, {"prompt": "q"}],\n oops: 1, "more": [{"prompt": "b"}]}\n'
    kept, quarantined = _read(tmp_path, text)
    assert [p for _, p in kept] == ["q"]
    [(_, raw, _), (_, _, why)] = quarantined
    assert raw == '{"prompt": "a",}' and why.startswith("the JSON object is not valid JSON (expected a key)") and "truncated" not in why
    _, cut = _read(tmp_path, '{"data": [{"prompt": "a"}], "k": ')
    assert [why.endswith("(truncated?)") for _, _, why in cut] == [True]


def test_bad_items_far_into_a_buffer_do_not_each_count_its_lines(tmp_path, monkeypatch):
    """A JSON error counts the lines of the text before it: with the consumed part of a 4 MiB
    buffer kept, each bad item counted up to 4 MiB (20,000 items, half bad: 16 s); the buffer
    drops what is done past 256 KiB."""
    counted = []
    real = json.JSONDecodeError.__init__

    def init(self, msg, doc, pos):
        counted.append(pos)
        real(self, msg, doc, pos)

    monkeypatch.setattr(json.JSONDecodeError, "__init__", init)
    pad = "y" * 200
    items = ['{"prompt": "bad %d %s",}' % (i, pad) if i % 2 == 0 else json.dumps({"prompt": f"good {i} {pad}"})
             for i in range(4000)]
    kept, quarantined = _read(tmp_path, _array(*items))
    assert len(kept) == 2000 and len(quarantined) == 2000
    assert max(counted) < 2 * jsonarray._COMPACT


def test_bad_items_one_after_another_are_each_quarantined_alone(tmp_path):
    text = _array(QS[0], '{"prompt": "bad1",}', '{"prompt": "bad2",}', QS[3])
    kept, quarantined = _read(tmp_path, text)
    assert kept == [(1, "q0"), (4, "q3")]
    assert [(row, raw) for row, raw, _ in quarantined] == [(2, '{"prompt": "bad1",}'), (3, '{"prompt": "bad2",}')]


def test_the_items_between_two_bad_ones_are_read(tmp_path):
    bad2 = '{"prompt": "He said "hi" to me"}'
    bad4 = '{"prompt": "x", "turns": [{"t": 1}, {"t": 2}],}'
    good = [json.dumps({"prompt": f"g{i}"}) for i in range(200)]
    kept, quarantined = _read(tmp_path, _array(QS[0], bad2, *good, bad4, QS[4]))
    assert kept == [(1, "q0")] + [(i + 3, f"g{i}") for i in range(200)] + [(204, "q4")]
    assert [(row, raw) for row, raw, _ in quarantined] == [(2, bad2), (203, bad4)]


def test_a_good_item_longer_than_the_search_window_after_a_bad_one_is_one_row(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonarray, "RESYNC", 1 << 12)  # the 1 MiB window, made small
    bad = '{"prompt": "He said "hi" to me"}'
    big = json.dumps({"prompt": "big", "turns": [{"text": f"turn {i}"} for i in range(6000)]})  # ~110 KB
    kept, quarantined = _read(tmp_path, _array(QS[0], bad, big, QS[3]))
    assert kept == [(1, "q0"), (3, "big"), (4, "q3")]
    assert [(row, raw) for row, raw, _ in quarantined] == [(2, bad)]


@pytest.mark.parametrize("bad", ['{"prompt": "bad %d", "k": 1', '{"prompt": "bad %d, "k": 1}'])
def test_bad_items_one_after_another_try_a_bounded_number_of_next_objects(tmp_path, monkeypatch, bad):
    """Each item left open tried every object after it in the window as the next item (all of
    them bad: quadratic); now at most ``CANDIDATES`` a bad item, and the good item at the end is
    read."""
    from guidealign.ingest import jsonpeek
    tried = []
    real = jsonpeek._rest_of_array

    def counting(text, at, inside):
        tried.append(at)
        return real(text, at, inside)

    monkeypatch.setattr(jsonpeek, "_rest_of_array", counting)
    n = 400
    kept, quarantined = _read(tmp_path, _array(*[bad % i for i in range(n)], QS[0]))
    assert kept[-1:] == [(len(kept) + len(quarantined), "q0")] and len(kept) == 1
    assert len(tried) <= n * jsonpeek.CANDIDATES


def test_quotes_left_out_in_two_items_do_not_make_rows_of_a_list_between(tmp_path):
    """A quote left out in item 3 and another in item 6 pair up: item 3's brackets then close in
    the middle of item 6's list of turns, and the turns after that point came out as rows. Where
    a nested list's end follows such an end, the next item that reads decides where item 3 ends."""
    items = [json.dumps({"prompt": "R0", "turns": [{"t": "n0_0"}]}), json.dumps({"prompt": "R1"}),
             '{"prompt: "R2"}', json.dumps({"prompt": "R3", "turns": [{"t": "n3_0"}, {"t": "n3_1"}]}),
             json.dumps({"prompt": "R4"}),
             '{"prompt": "R5", "turns": [{"t": "n5_0"}, {"t": n5_1"}, {"t": "n5_2"}, {"t": "n5_3"}]}',
             json.dumps({"prompt": "R6"})]
    kept, quarantined = _read(tmp_path, '{"data": ' + _array(*items) + ', "note": "x"}')
    assert kept == [(1, "R0"), (2, "R1"), (4, "R3"), (5, "R4"), (7, "R6")]
    assert [row for row, _, _ in quarantined] == [3, 6]
