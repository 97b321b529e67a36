"""The line ends of a JSONL block, and whether it has two spaces in a row, in one compiled pass.

``jsonl.scan_lines`` needs both for every block. In numpy they take four passes over the
block's bytes (``== 10``, ``flatnonzero``, ``== 32`` and a shifted ``and``): ~3 ms a 4 MiB block,
on the thread that parses. This is one pass, 64 bytes at a time (one vector compare each, the
line ends read off its bit mask), built with llvmlite like ``blake2_llvm`` and called through
ctypes, which releases the GIL. The tests check it against the numpy pass on blocks around every
vector edge.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from guidealign.ingest.llvm_build import build, load

FUNC = "guidealign_line_ends"
WIDTH = 64  # bytes compared at once (one AVX-512 vector, two AVX2 ones)
LINE_GUESS = 48  # bytes a line, at least, on average, for the room first given to the line ends


def _module():
    """LLVM IR of ``i64 FUNC(i8* data, i64 n, i64* ends, i64 cap, i64* double)``: writes the
    positions of the first ``cap`` ``\\n`` of ``data[:n]`` to ``ends`` (room for ``cap + 1``: the
    others all go to ``ends[cap]``), sets ``*double`` to 1 when two spaces follow each other
    somewhere (else 0), and returns how many line ends there are (more than ``cap``: call again
    with room for them)."""
    from llvmlite import ir

    i1, i8, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(64)
    bytes_v = ir.VectorType(i8, WIDTH)
    mask_t = ir.IntType(WIDTH)  # a compare of two vectors (WIDTH x i1) read as one integer

    def c64(x):
        return ir.Constant(i64, x)

    mod = ir.Module(name="guidealign_line_ends")
    fn = ir.Function(mod, ir.FunctionType(i64, [i8.as_pointer(), i64, i64.as_pointer(), i64, i64.as_pointer()]),
                     name=FUNC)
    data, n, ends, cap, double = fn.args

    def slot(k):  # where line end k goes: its own place, or the spare one past cap
        return b.gep(ends, [b.select(b.icmp_signed("<", k, cap), k, cap)])
    # (llvmlite's declare_intrinsic leaves out cttz's second argument)
    cttz = ir.Function(mod, ir.FunctionType(mask_t, [mask_t, i1]), name=f"llvm.cttz.i{WIDTH}")
    blocks = [fn.append_basic_block(x) for x in
              ("entry", "vhead", "vbody", "bits", "vnext", "thead", "tbody", "done")]
    entry, vhead, vbody, bits, vnext, thead, tbody, done = blocks
    b = ir.IRBuilder(entry)
    b.branch(vhead)

    # for i in range(0, n - WIDTH, WIDTH): a vector and the one after it by a byte (for the pairs)
    b.position_at_end(vhead)
    i = b.phi(i64)
    k = b.phi(i64)
    dbl = b.phi(mask_t)
    i.add_incoming(c64(0), entry)
    k.add_incoming(c64(0), entry)
    dbl.add_incoming(ir.Constant(mask_t, 0), entry)
    b.cbranch(b.icmp_signed("<=", b.add(i, c64(WIDTH + 1)), n), vbody, thead)

    b.position_at_end(vbody)
    vec_ptr = bytes_v.as_pointer()
    v = b.load(b.bitcast(b.gep(data, [i]), vec_ptr), align=1)
    v1 = b.load(b.bitcast(b.gep(data, [b.add(i, c64(1))]), vec_ptr), align=1)
    newline = b.bitcast(b.icmp_unsigned("==", v, ir.Constant(bytes_v, [10] * WIDTH)), mask_t)
    space = ir.Constant(bytes_v, [32] * WIDTH)
    pair = b.and_(b.icmp_unsigned("==", v, space), b.icmp_unsigned("==", v1, space))
    dbl2 = b.or_(dbl, b.bitcast(pair, mask_t))
    b.cbranch(b.icmp_unsigned("==", newline, ir.Constant(mask_t, 0)), vnext, bits)

    # each set bit of the mask: one line end
    b.position_at_end(bits)
    m = b.phi(mask_t)
    kk = b.phi(i64)
    m.add_incoming(newline, vbody)
    kk.add_incoming(k, vbody)
    tz = b.zext(b.call(cttz, [m, ir.Constant(i1, 0)]), i64)
    b.store(b.add(i, tz), slot(kk))
    kk2 = b.add(kk, c64(1))
    m2 = b.and_(m, b.sub(m, ir.Constant(mask_t, 1)))
    m.add_incoming(m2, bits)
    kk.add_incoming(kk2, bits)
    b.cbranch(b.icmp_unsigned("==", m2, ir.Constant(mask_t, 0)), vnext, bits)

    b.position_at_end(vnext)
    k_next = b.phi(i64)
    k_next.add_incoming(k, vbody)
    k_next.add_incoming(kk2, bits)
    i.add_incoming(b.add(i, c64(WIDTH)), vnext)
    k.add_incoming(k_next, vnext)
    dbl.add_incoming(dbl2, vnext)
    b.branch(vhead)

    # the last bytes one at a time
    b.position_at_end(thead)
    j = b.phi(i64)
    kt = b.phi(i64)
    dt = b.phi(mask_t)
    j.add_incoming(i, vhead)
    kt.add_incoming(k, vhead)
    dt.add_incoming(dbl, vhead)
    b.cbranch(b.icmp_signed("<", j, n), tbody, done)

    b.position_at_end(tbody)
    c = b.load(b.gep(data, [j]))
    b.store(j, slot(kt))  # kept only when it is a line end (the next one overwrites it)
    kt2 = b.add(kt, b.zext(b.icmp_unsigned("==", c, ir.Constant(i8, 10)), i64))
    nxt = b.add(j, c64(1))
    has_next = b.icmp_signed("<", nxt, n)
    c1 = b.load(b.gep(data, [b.select(has_next, nxt, j)]))
    two = b.and_(has_next, b.and_(b.icmp_unsigned("==", c, ir.Constant(i8, 32)),
                                  b.icmp_unsigned("==", c1, ir.Constant(i8, 32))))
    dt2 = b.or_(dt, b.zext(two, mask_t))
    j.add_incoming(nxt, tbody)
    kt.add_incoming(kt2, tbody)
    dt.add_incoming(dt2, tbody)
    b.branch(thead)

    b.position_at_end(done)
    b.store(b.zext(b.icmp_unsigned("!=", dt, ir.Constant(mask_t, 0)), i64), double)
    b.ret(kt)
    return mod


_CFUNC = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                          ctypes.c_void_p)


def _make():
    ee, addrs = build(_module, Path(__file__), [FUNC])
    return ee, _CFUNC(addrs[FUNC])


def kernel():
    """The compiled function (built on first use), or None when it cannot be had (no llvmlite;
    a build or self-test that failed, said once as a warning): numpy scans then."""
    return load("line-end", _make, _self_test, "scanning with numpy")


def line_ends(arr: np.ndarray, fn=None) -> tuple[np.ndarray, bool]:
    """(positions of the ``\\n`` bytes of ``arr`` (uint8, contiguous) as int64, whether two spaces
    follow each other somewhere) with the compiled kernel ``fn`` (default: ``kernel()``)."""
    fn = fn or kernel()
    n = arr.size
    cap = n // LINE_GUESS + 16  # room for lines of LINE_GUESS bytes on average; else a second pass
    flag = np.zeros(1, dtype=np.int64)
    while True:
        out = np.empty(cap + 1, dtype=np.int64)
        k = fn(arr.ctypes.data if n else out.ctypes.data, n, out.ctypes.data, cap, flag.ctypes.data)
        if k <= cap:
            return out[:k], bool(flag[0])
        cap = k


def _self_test(fn) -> None:
    """The kernel must find what numpy finds, around every vector edge, before it scans a block."""
    for n in (0, 1, 2, WIDTH - 1, WIDTH, WIDTH + 1, WIDTH + 2, 2 * WIDTH + 1, 1000):
        for p in (0.0, 0.3, 1.0):
            arr = np.where(_spread(n, 1) < p, 10, np.where(_spread(n, 2) < 0.2, 32, 65)).astype(np.uint8)
            got, dbl = line_ends(arr, fn)
            want = np.flatnonzero(arr == 10)
            want_dbl = bool(n > 1 and ((arr[1:] == 32) & (arr[:-1] == 32)).any())
            if not (np.array_equal(got, want) and dbl == want_dbl):
                raise RuntimeError("the compiled line-end kernel does not match numpy")


def _spread(n: int, seed: int) -> np.ndarray:
    """``n`` numbers in [0, 1) spread like random ones, the same each run (a multiplicative hash
    of 0..n-1: numpy's random module would add ~4 ms to every run's start)."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64(seed * 7919)) * np.uint64(0x9E3779B97F4A7C15)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
