"""blake2b-64 of every string of an Arrow string array, as machine code built with llvmlite.

``hashlib.blake2b(s, digest_size=8)`` costs ~1 us a call from Python, about half of it call
overhead, and it holds the GIL; ingest hashes every prompt. This is the same function
(RFC 7693, unkeyed, 8-byte digest) written as LLVM IR (``_module``), four messages at a time in
the 64-bit lanes of one vector (2.3x the one-at-a-time version on AVX2), compiled once for this
machine's CPU and called through ctypes, which releases the GIL, so the hashing of one block
runs beside the parsing and the Parquet writing of others. ``out[i]`` is the digest read as a
little-endian uint64, i.e. ``int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(),
"little")``; the tests check it against hashlib on every length around the block edges.

Why not numba: loading numba and its cached machine code costs ~1 s of CPU at every start and
~130 MiB of memory; llvmlite alone (numba's code generator, installed with it) costs ~0.1 s. The
object code is cached (``llvm_build``), so only the first run on a machine compiles (~0.2 s).
"""
from __future__ import annotations

import ctypes
import hashlib
import sys
from pathlib import Path

import numpy as np

from guidealign.ingest.llvm_build import build, load

IV = [0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
      0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179]
SIGMA = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0]]
# the four columns, then the four diagonals, of the 4x4 state
G_INDEX = [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]
PARAM = 0x01010008  # digest length 8, no key, fanout 1, depth 1
FUNC = "guidealign_blake2b64_many"


LANES = 4  # messages hashed side by side, one per 64-bit lane of a 256-bit vector (AVX2)


def _module():
    """LLVM IR of ``void FUNC(i64 n, i64* starts, i64* ends, i8* data, i64* out)``: message i is
    ``data[starts[i]:ends[i]]``.

    Four messages at a time, one per vector lane: each lane walks its own message's blocks (a
    lane that has finished keeps its state), so one pass of the 12 rounds serves four prompts.
    Every block goes through a zero-filled 128-byte lane buffer (the last one is short), which
    keeps the loop free of branches per lane. The last group repeats message ``n - 1`` in its
    spare lanes (the same digest written to the same place)."""
    from llvmlite import ir

    i1, i8, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
    vec = ir.VectorType(i64, LANES)

    def c64(x):
        return ir.Constant(i64, x & 0xFFFFFFFFFFFFFFFF)

    def c32(x):
        return ir.Constant(i32, x)

    def splat(x):
        return ir.Constant(vec, [x & 0xFFFFFFFFFFFFFFFF] * LANES)

    def lanes(values, ty=vec):
        out = ir.Constant(ty, None)
        for k, x in enumerate(values):
            out = b.insert_element(out, x, c32(k))
        return out

    mod = ir.Module(name="guidealign_blake2b64")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64, i64.as_pointer(), i64.as_pointer(),
                                                          i8.as_pointer(), i64.as_pointer()]), name=FUNC)
    n, starts, ends, data, out = fn.args
    entry, head, body, blk_head, blk_body, tail, done = (
        fn.append_basic_block(x) for x in ("entry", "head", "body", "blk_head", "blk_body", "tail", "done"))
    memcpy = mod.declare_intrinsic("llvm.memcpy", [i8.as_pointer(), i8.as_pointer(), i64])
    b = ir.IRBuilder(entry)
    hv = b.alloca(vec, c32(8))                     # the four states, word by word
    pad = b.alloca(i64, c32(16 * LANES))           # one 128-byte block buffer per lane
    b.branch(head)

    b.position_at_end(head)                        # for g in range(0, n, LANES)
    g = b.phi(i64)
    g.add_incoming(c64(0), entry)
    b.cbranch(b.icmp_signed("<", g, n), body, done)

    b.position_at_end(body)
    last_i = b.sub(n, c64(1))
    idx, lo, ln, nb = [], [], [], []
    for k in range(LANES):
        i = b.add(g, c64(k))
        i = b.select(b.icmp_signed("<", i, n), i, last_i)
        idx.append(i)
        lo.append(b.load(b.gep(starts, [i])))
        ln.append(b.sub(b.load(b.gep(ends, [i])), lo[-1]))
        blocks = b.lshr(b.add(ln[-1], c64(127)), c64(7))  # 0 bytes: still one (empty) block
        nb.append(b.select(b.icmp_signed("<", blocks, c64(1)), c64(1), blocks))
    most = nb[0]
    for k in range(1, LANES):
        most = b.select(b.icmp_signed(">", nb[k], most), nb[k], most)
    for w in range(8):
        b.store(splat(IV[w] ^ (PARAM if w == 0 else 0)), b.gep(hv, [c32(w)]))
    b.branch(blk_head)

    b.position_at_end(blk_head)                    # for j in range(most blocks of the group)
    j = b.phi(i64)
    j.add_incoming(c64(0), body)
    b.cbranch(b.icmp_signed("<", j, most), blk_body, tail)

    b.position_at_end(blk_body)
    t_k, last_k, on_k = [], [], []
    for k in range(LANES):
        pos = b.add(lo[k], b.shl(j, c64(7)))
        left = b.sub(ln[k], b.shl(j, c64(7)))
        cnt = b.select(b.icmp_signed("<", left, c64(0)), c64(0),
                       b.select(b.icmp_signed(">", left, c64(128)), c64(128), left))
        dst = b.gep(pad, [c32(16 * k)])
        for w in range(16):
            b.store(c64(0), b.gep(dst, [c32(w)]))
        b.call(memcpy, [b.bitcast(dst, i8.as_pointer()), b.gep(data, [pos]), cnt, ir.Constant(i1, 0)])
        is_last = b.icmp_signed("==", j, b.sub(nb[k], c64(1)))
        last_k.append(b.select(is_last, c64(-1), c64(0)))
        t_k.append(b.select(is_last, ln[k], b.add(b.shl(j, c64(7)), c64(128))))
        on_k.append(b.icmp_signed("<", j, nb[k]))
    t, f, on = lanes(t_k), lanes(last_k), lanes(on_k, ir.VectorType(i1, LANES))
    m = [lanes([b.load(b.gep(pad, [c32(16 * k + w)])) for k in range(LANES)]) for w in range(16)]
    h = [b.load(b.gep(hv, [c32(w)])) for w in range(8)]
    v = h + [splat(x) for x in IV]
    v[12] = b.xor(v[12], t)
    v[14] = b.xor(v[14], f)

    def rotr(x, r):
        return b.or_(b.lshr(x, splat(r)), b.shl(x, splat(64 - r)))

    for r in range(12):
        s = SIGMA[r % 10]
        for q, (a, bb, c, d) in enumerate(G_INDEX):
            v[a] = b.add(b.add(v[a], v[bb]), m[s[2 * q]])
            v[d] = rotr(b.xor(v[d], v[a]), 32)
            v[c] = b.add(v[c], v[d])
            v[bb] = rotr(b.xor(v[bb], v[c]), 24)
            v[a] = b.add(b.add(v[a], v[bb]), m[s[2 * q + 1]])
            v[d] = rotr(b.xor(v[d], v[a]), 16)
            v[c] = b.add(v[c], v[d])
            v[bb] = rotr(b.xor(v[bb], v[c]), 63)
    for w in range(8):                             # lanes past their last block keep their state
        b.store(b.select(on, b.xor(h[w], b.xor(v[w], v[w + 8])), h[w]), b.gep(hv, [c32(w)]))
    j.add_incoming(b.add(j, c64(1)), blk_body)
    b.branch(blk_head)

    b.position_at_end(tail)
    h0 = b.load(b.gep(hv, [c32(0)]))
    for k in range(LANES):
        b.store(b.extract_element(h0, c32(k)), b.gep(out, [idx[k]]))
    g.add_incoming(b.add(g, c64(LANES)), tail)
    b.branch(head)

    b.position_at_end(done)
    b.ret_void()
    return mod


_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p)


def _make():
    ee, addrs = build(_module, Path(__file__), [FUNC])
    return ee, _CFUNC(addrs[FUNC])


def _self_test(fn) -> None:
    """Ids must never change: the kernel must give hashlib's digests (around every block edge)
    before it hashes a single prompt; otherwise ingest hashes with hashlib."""
    msgs = [bytes((i * 7 + n) % 251 for i in range(n)) for n in (0, 1, 8, 127, 128, 129, 255, 256, 257, 1000)]
    offsets = np.cumsum([0] + [len(m) for m in msgs]).astype(np.int64)
    data = np.frombuffer(b"".join(msgs), np.uint8)
    out = np.empty(len(msgs), np.uint64)
    starts, ends = offsets[:-1].copy(), offsets[1:].copy()
    fn(len(msgs), starts.ctypes.data, ends.ctypes.data, data.ctypes.data, out.ctypes.data)
    want = [int.from_bytes(hashlib.blake2b(m, digest_size=8).digest(), "little") for m in msgs]
    if out.tolist() != want:
        raise RuntimeError("the compiled blake2b kernel does not match hashlib")


def kernel():
    """The compiled function (built on first use), or None when it cannot be had (no llvmlite,
    a big-endian machine; a build or self-test that failed, said once as a warning): hashlib
    hashes then, with the same ids."""
    if sys.byteorder != "little":
        return None
    return load("blake2b", _make, _self_test, "hashing with hashlib")


def available() -> bool:
    try:
        import llvmlite  # noqa: F401
    except ImportError:
        return False
    return sys.byteorder == "little"


def blake2b64_spans(starts: np.ndarray, ends: np.ndarray, data_address: int) -> np.ndarray:
    """uint64 blake2b-64 of the bytes ``[data_address + starts[i], data_address + ends[i])``."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.ascontiguousarray(ends, dtype=np.int64)
    if starts.shape != ends.shape:
        raise ValueError("blake2b64_spans: starts and ends differ in length")
    out = np.empty(len(starts), dtype=np.uint64)
    if len(out):
        kernel()(len(out), starts.ctypes.data, ends.ctypes.data, data_address, out.ctypes.data)
    return out


_NUL = np.zeros(1, dtype=np.uint8)


def blake2b64(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint64 blake2b-64 of ``data[offsets[i]:offsets[i+1]]`` for each i."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 2:
        return np.empty(0, dtype=np.uint64)
    return blake2b64_spans(offsets[:-1], offsets[1:], (data if data.size else _NUL).ctypes.data)
