"""JSONL block scan (``jsonl.scan_lines``): one pass gives the line ends, the double-space and
blank-line screens and the "every line is one object" screen; checked against Python's own byte
methods in any step size."""
import random

import numpy as np

from guidealign.ingest.jsonl import scan_lines


def _objects_reference(b: bytes) -> bool:
    lines = b.split(b"\n")
    if lines and lines[-1] == b"" and len(lines) > 1:
        lines.pop()  # the block's last line end
    if b == b"":
        return True
    for ln in lines:
        if ln.endswith(b"\r"):
            ln = ln[:-1]
        if not (ln.startswith(b"{") and ln.endswith(b"}")):
            return False
    return True


def test_scan_lines_matches_byte_methods_in_any_step():
    rng = random.Random(0)
    alphabet = b'{}[] \n\r"a'
    for _ in range(3000):
        b = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:  # lines that mostly are objects
            b = b"\n".join(b"{" + bytes(rng.choice(b'a "[]') for _ in range(rng.randint(0, 4))) + b"}"
                           + (b"\r" if rng.random() < 0.2 else b"") for _ in range(rng.randint(1, 5)))
            b += b"\n" if rng.random() < 0.7 else b""
            if rng.random() < 0.3:  # one byte changed anywhere
                k = rng.randrange(len(b))
                b = b[:k] + bytes([rng.choice(alphabet)]) + b[k + 1:]
        arr = np.frombuffer(b, np.uint8)
        for step in (1, 2, 3, 7, 64, 1 << 16):
            sc = scan_lines(arr, step)
            assert sc.ends.tolist() == [i for i, c in enumerate(b) if c == 10], (b, step)
            assert sc.double_space == (b"  " in b), (b, step)
            blank = any(not ln.strip() for ln in b.split(b"\n")[:-1]) or (b and not b.split(b"\n")[-1].strip()
                                                                          and not b.endswith(b"\n"))
            if blank:
                assert sc.maybe_blank, (b, step)  # a blank line is never missed
            assert sc.objects == _objects_reference(b), (b, step)


def test_scan_lines_objects_examples():
    def objects(b):
        return scan_lines(np.frombuffer(b, np.uint8)).objects

    assert objects(b'{"a":1}\n{"b":2}\n') and objects(b'{"a":1}\r\n{"b":2}') and objects(b"{}")
    # a value going on into the next line, a blank line, blank space around a line
    for bad in (b'{"a":[\n1]}\n', b'{"a":1}\n\n{"b":2}\n', b'{"a":1}\n {"b":2}\n', b'{"a":1}\r\r\n{"b":2}\n',
                b'{"a":1}\n{"b":[{"c":1}\n]}\n', b"{\n}\n", b"}\n{"):
        assert not objects(bad), bad


def test_block_scan_positions_are_the_line_ends():
    """``blocks.scan(positions=True)`` (CSV's scan: the line ends for the records' line numbers
    and the row reader's fallback) gives every line end's position, in any step size, and the
    same counts as without positions."""
    from guidealign.ingest.blocks import scan

    rng = random.Random(1)
    for _ in range(500):
        b = bytes(rng.choice(b'ab \r\n\t"') for _ in range(rng.randint(0, 200)))
        arr = np.frombuffer(b, np.uint8)
        for step in (1, 2, 3, 7, 64, 1 << 16):
            with_pos = scan(arr, step, count_ctrl=True, count_cr=True, positions=True)
            plain = scan(arr, step, count_ctrl=True, count_cr=True)
            assert with_pos.nl.tolist() == [i for i, c in enumerate(b) if c == 10], (b, step)
            assert plain.nl is None
            assert [getattr(with_pos, k) for k in ("n_nl", "maybe_blank", "double_space", "n_ctrl", "n_cr",
                                                   "n_crlf", "long_line")] == \
                [getattr(plain, k) for k in ("n_nl", "maybe_blank", "double_space", "n_ctrl", "n_cr",
                                             "n_crlf", "long_line")], (b, step)
