"""blake2b-64 of every string of an Arrow string array, as machine code built with llvmlite.

``hashlib.blake2b(s, digest_size=8)`` costs ~1 us a call from Python, about half of it call
overhead, and it holds the GIL; ingest hashes every prompt. This is the same function
(RFC 7693, unkeyed, 8-byte digest) written as LLVM IR (``_module``), compiled once for this
machine's CPU and called through ctypes, which releases the GIL, so the hashing of one block
runs beside the parsing and the Parquet writing of others. ``out[i]`` is the digest read as a
little-endian uint64, i.e. ``int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(),
"little")``; the tests check it against hashlib on every length around the block edges.

Why not numba: loading numba and its cached machine code costs ~1 s of CPU at every start and
~130 MiB of memory; llvmlite alone (numba's code generator, installed with it) costs ~0.1 s. The object code is cached in ``__pycache__``
beside this file (keyed by this file, LLVM's version and the CPU), so only the first run on a
machine compiles (~0.2 s); without a writable cache it compiles every run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

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


def _module():
    """LLVM IR of ``void FUNC(i64 n, i64* offsets, i8* data, i64* out)``."""
    from llvmlite import ir

    i1, i8, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)

    def c64(x):
        return ir.Constant(i64, x & 0xFFFFFFFFFFFFFFFF)

    def c32(x):
        return ir.Constant(i32, x)

    mod = ir.Module(name="guidealign_blake2b64")
    # compress(h: i64[8]*, msg: 128 bytes, t: bytes so far, last: final block)
    comp = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64.as_pointer(), i8.as_pointer(), i64, i1]),
                       name="compress")
    comp.linkage = "internal"
    hp, msg, t, last = comp.args
    b = ir.IRBuilder(comp.append_basic_block("entry"))
    words = b.bitcast(msg, i64.as_pointer())
    m = [b.load(b.gep(words, [c32(w)]), align=1) for w in range(16)]  # little-endian host only
    h = [b.load(b.gep(hp, [c32(k)])) for k in range(8)]
    v = h + [c64(x) for x in IV]
    v[12] = b.xor(v[12], t)
    v[14] = b.select(last, c64(~IV[6]), c64(IV[6]))

    def rotr(x, n):
        return b.or_(b.lshr(x, c64(n)), b.shl(x, c64(64 - n)))

    for r in range(12):
        s = SIGMA[r % 10]
        for j, (a, bb, c, d) in enumerate(G_INDEX):
            v[a] = b.add(b.add(v[a], v[bb]), m[s[2 * j]])
            v[d] = rotr(b.xor(v[d], v[a]), 32)
            v[c] = b.add(v[c], v[d])
            v[bb] = rotr(b.xor(v[bb], v[c]), 24)
            v[a] = b.add(b.add(v[a], v[bb]), m[s[2 * j + 1]])
            v[d] = rotr(b.xor(v[d], v[a]), 16)
            v[c] = b.add(v[c], v[d])
            v[bb] = rotr(b.xor(v[bb], v[c]), 63)
    for k in range(8):
        b.store(b.xor(h[k], b.xor(v[k], v[k + 8])), b.gep(hp, [c32(k)]))
    b.ret_void()

    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64, i64.as_pointer(), i8.as_pointer(),
                                                          i64.as_pointer()]), name=FUNC)
    n, offs, data, out = fn.args
    entry, head, body, blk_head, blk_body, tail, done = (
        fn.append_basic_block(x) for x in ("entry", "head", "body", "blk_head", "blk_body", "tail", "done"))
    b = ir.IRBuilder(entry)
    hbuf = b.alloca(i64, c32(8))
    pad = b.alloca(i64, c32(16))
    padb = b.bitcast(pad, i8.as_pointer())
    b.branch(head)
    b.position_at_end(head)                          # for i in range(n)
    i = b.phi(i64)
    i.add_incoming(c64(0), entry)
    b.cbranch(b.icmp_signed("<", i, n), body, done)
    b.position_at_end(body)
    lo = b.load(b.gep(offs, [i]))
    hi = b.load(b.gep(offs, [b.add(i, c64(1))]))
    for k in range(8):
        b.store(c64(IV[k] ^ (PARAM if k == 0 else 0)), b.gep(hbuf, [c32(k)]))
    b.branch(blk_head)
    b.position_at_end(blk_head)                      # every full block but the last
    pos = b.phi(i64)
    pos.add_incoming(lo, body)
    b.cbranch(b.icmp_signed(">", b.sub(hi, pos), c64(128)), blk_body, tail)
    b.position_at_end(blk_body)
    nxt = b.add(pos, c64(128))
    b.call(comp, [hbuf, b.gep(data, [pos]), b.sub(nxt, lo), ir.Constant(i1, 0)])
    pos.add_incoming(nxt, blk_body)
    b.branch(blk_head)
    b.position_at_end(tail)                          # the last block, zero-padded (empty input too)
    for w in range(16):
        b.store(c64(0), b.gep(pad, [c32(w)]))
    memcpy = mod.declare_intrinsic("llvm.memcpy", [i8.as_pointer(), i8.as_pointer(), i64])
    b.call(memcpy, [padb, b.gep(data, [pos]), b.sub(hi, pos), ir.Constant(i1, 0)])
    b.call(comp, [hbuf, padb, b.sub(hi, lo), ir.Constant(i1, 1)])
    b.store(b.load(hbuf), b.gep(out, [i]))
    i.add_incoming(b.add(i, c64(1)), tail)
    b.branch(head)
    b.position_at_end(done)
    b.ret_void()
    return mod


_LOCK = threading.Lock()
_STATE: dict = {}
_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _cache_file(llvm, cpu: str, features: str) -> Path:
    key = hashlib.sha256(b"\0".join([Path(__file__).read_bytes(), repr(llvm.llvm_version_info).encode(),
                                     llvm.get_process_triple().encode(), cpu.encode(), features.encode()]))
    return Path(__file__).parent / "__pycache__" / f"blake2b64-{key.hexdigest()[:20]}.o"


def _build():
    import llvmlite.binding as llvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            llvm.initialize()  # llvmlite < 0.45 needs it; later ones initialize themselves (and raise)
        except RuntimeError:
            pass
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=2)
    cache = _cache_file(llvm, cpu, features)
    ee = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
    try:
        obj = cache.read_bytes()
    except OSError:
        obj = None
    if obj is None:
        mod = llvm.parse_assembly(str(_module()))
        mod.verify()
        # no IR pass pipeline (its API differs between llvmlite versions): the IR is straight-line
        # code already, and the code generator's own optimization (opt=2) makes it as fast
        obj = tm.emit_object(mod)
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(obj)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only install: compile every run
    ee.add_object_file(llvm.ObjectFileRef.from_data(obj))
    ee.finalize_object()
    addr = ee.get_function_address(FUNC)
    if not addr:
        raise RuntimeError(f"{FUNC} not found in the compiled object")
    fn = _CFUNC(addr)
    _self_test(fn)
    return ee, fn


def _self_test(fn) -> None:
    """Ids must never change: the kernel must give hashlib's digests (around every block edge)
    before it hashes a single prompt; otherwise ingest hashes with hashlib."""
    msgs = [bytes((i * 7 + n) % 251 for i in range(n)) for n in (0, 1, 8, 127, 128, 129, 255, 256, 257, 1000)]
    offsets = np.cumsum([0] + [len(m) for m in msgs]).astype(np.int64)
    data = np.frombuffer(b"".join(msgs), np.uint8)
    out = np.empty(len(msgs), np.uint64)
    fn(len(msgs), offsets.ctypes.data, data.ctypes.data, out.ctypes.data)
    want = [int.from_bytes(hashlib.blake2b(m, digest_size=8).digest(), "little") for m in msgs]
    if out.tolist() != want:
        raise RuntimeError("the compiled blake2b kernel does not match hashlib")


def kernel():
    """The compiled function (built on first use; thread-safe), or None when llvmlite is missing
    or this is a big-endian machine."""
    with _LOCK:
        if "fn" not in _STATE:
            fn = None
            if sys.byteorder == "little":
                try:
                    _STATE["ee"], fn = _build()  # the engine owns the code: keep it alive
                except ImportError:
                    fn = None
            _STATE["fn"] = fn
        return _STATE["fn"]


def available() -> bool:
    try:
        import llvmlite  # noqa: F401
    except ImportError:
        return False
    return sys.byteorder == "little"


def blake2b64_buffers(offsets: np.ndarray, data_address: int) -> np.ndarray:
    """uint64 blake2b-64 of the bytes ``[data_address + offsets[i], data_address + offsets[i+1])``."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    out = np.empty(max(len(offsets) - 1, 0), dtype=np.uint64)
    if len(out):
        kernel()(len(out), offsets.ctypes.data, data_address, out.ctypes.data)
    return out


_NUL = np.zeros(1, dtype=np.uint8)


def blake2b64(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint64 blake2b-64 of ``data[offsets[i]:offsets[i+1]]`` for each i."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return blake2b64_buffers(offsets, (data if data.size else _NUL).ctypes.data)
