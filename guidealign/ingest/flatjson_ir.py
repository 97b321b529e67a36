"""LLVM IR of the flat-JSON kernels, which ``flatjson_llvm`` builds, checks and calls.

``i64 PARSE(i8* data, i64* starts, i64* stops, i64 nlines, i64 kmax, i64* keys, i8* kinds,
i64* vstart, i64* vval, i8* esc, i64* nkeys)``: line ``i`` is ``data[starts[i]:stops[i]]``. Key
``c`` is ``data[keys[2c]:][:keys[2c+1]]``, ``kinds[c]`` 1 (strings) or 2 (integers); the value
of key ``c`` on line ``i`` (slot ``i*kmax+c``): ``vstart`` -1 when the line has none, else where
it starts, ``vval`` where a string ends (before its quote) or the integer, ``esc`` 1 when a
string has a backslash. Returns 0, 1 + the line that is not flat, or TOO_MANY_KEYS.

``i64 GATHER(i8* data, i64* vstart, i64* vval, i8* esc, i64 nlines, i64 kmax, i64 col, i8* out,
i32* offsets)``: the strings of key ``col`` decoded into ``out`` with Arrow ``offsets``
(``nlines + 1``; a line without it: an empty slot); returns the bytes written, or -1 for an
escape that does not decode.

Both are written with stack variables and structured loops (``_Fn``); LLVM's optimizer
(``llvm_build.build(optimize=True)``) puts the variables in registers.
"""
from __future__ import annotations

PARSE, GATHER = "guidealign_flat_parse", "guidealign_flat_gather"
TOO_MANY_KEYS = -2
WIDTH = 32  # bytes of a string looked at at once, for its closing quote
MAX_DIGITS = 18  # an integer of more digits goes to pyarrow.json (which may read it as a float)
_ESCAPES = {ord('"'): 34, ord("\\"): 92, ord("/"): 47, ord("b"): 8, ord("f"): 12, ord("n"): 10,
            ord("r"): 13, ord("t"): 9}


def module():
    """An ``llvmlite.ir`` module with both kernels."""
    from llvmlite import ir

    mod = ir.Module(name="guidealign_flatjson")
    _parse(ir, mod)
    _gather(ir, mod)
    return mod


class _Fn:
    """A function being written: its builder, variables (allocas) and structured control flow."""

    def __init__(self, ir, mod, name, ret, args):
        self.ir = ir
        self.i64 = ir.IntType(64)
        self.f = ir.Function(mod, ir.FunctionType(ret, args), name=name)
        self.b = ir.IRBuilder(self.f.append_basic_block("entry"))

    def var(self, init, ty=None):
        with self.b.goto_entry_block():
            a = self.b.alloca(ty or self.i64)
        self.b.store(init, a)
        return a

    def get(self, a):
        return self.b.load(a)

    def set(self, a, v):
        self.b.store(v, a)

    def inc(self, a, by=1):
        step = self.ir.Constant(self.i64, by) if isinstance(by, int) else by
        self.b.store(self.b.add(self.b.load(a), step), a)

    def loop(self, cond, body):
        """while cond(): body(head, after) (branch to head: continue; to after: break)."""
        b = self.b
        head, bod, after = (self.f.append_basic_block() for _ in range(3))
        b.branch(head)
        b.position_at_end(head)
        b.cbranch(cond(), bod, after)
        b.position_at_end(bod)
        body(head, after)
        if not b.block.is_terminated:
            b.branch(head)
        b.position_at_end(after)

    def require(self, ok, fail):
        """Go on where ``ok`` holds, else to the block ``fail``."""
        cont = self.f.append_basic_block()
        self.b.cbranch(ok, cont, fail)
        self.b.position_at_end(cont)


def _types(ir):
    i1, i8, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
    return i1, i8, i32, i64, (lambda x: ir.Constant(i64, x)), (lambda x: ir.Constant(i8, x))


def _parse(ir, mod) -> None:  # noqa: C901 - one kernel, written out as the loops it is
    """Each line checked against the flat shape, its values' places recorded (module doc)."""
    i1, i8, i32, i64, c64, c8 = _types(ir)
    p8, p64 = i8.as_pointer(), i64.as_pointer()
    P = _Fn(ir, mod, PARSE, i64, [p8, p64, p64, i64, i64, p64, p8, p64, p64, p8, p64])
    data, starts, stops, nlines, kmax, keys, kinds, vstart, vval, esc, nkeys = P.f.args
    b = P.b
    fail = P.f.append_basic_block("fail")
    line, p, e, nk = P.var(c64(0)), P.var(c64(0)), P.var(c64(0)), P.var(c64(0))

    def byte_at(q):  # data[q] on this line, 0 past its end (which every check then refuses)
        inside = b.icmp_signed("<", q, P.get(e))
        return b.select(inside, b.load(b.gep(data, [b.select(inside, q, c64(0))])), c8(0))

    def cur():
        return byte_at(P.get(p))

    def is_ws(ch):
        return b.or_(b.or_(b.icmp_unsigned("==", ch, c8(32)), b.icmp_unsigned("==", ch, c8(9))),
                     b.icmp_unsigned("==", ch, c8(13)))

    def is_digit(ch):
        return b.icmp_unsigned("<", b.sub(ch, c8(48)), c8(10))

    def skip_ws():
        P.loop(lambda: is_ws(cur()), lambda h, a: P.inc(p))

    vec_t, mask_t = ir.VectorType(i8, WIDTH), ir.IntType(WIDTH)
    cttz = ir.Function(mod, ir.FunctionType(mask_t, [mask_t, i1]), name=f"llvm.cttz.i{WIDTH}")

    def splat(x):
        return ir.Constant(vec_t, [x] * WIDTH)

    def scan_string(has_esc=None):
        """Move ``p`` (just past an opening quote) to the closing quote, WIDTH bytes at a time
        up to the next quote, backslash or control byte. A control byte fails; so does a
        backslash where ``has_esc`` is None (a key), else it sets it and skips its pair."""
        def outer(ohead, oafter):
            def vec(h, a):
                q = P.get(p)
                v = b.load(b.bitcast(b.gep(data, [q]), vec_t.as_pointer()), align=1)
                hit = b.or_(b.or_(b.icmp_unsigned("==", v, splat(34)), b.icmp_unsigned("==", v, splat(92))),
                            b.icmp_unsigned("<", v, splat(32)))
                m = b.bitcast(hit, mask_t)
                with b.if_then(b.icmp_unsigned("!=", m, ir.Constant(mask_t, 0))):
                    P.set(p, b.add(q, b.zext(b.call(cttz, [m, ir.Constant(i1, 1)]), i64)))
                    b.branch(a)
                P.set(p, b.add(q, c64(WIDTH)))
            P.loop(lambda: b.icmp_signed("<=", b.add(P.get(p), c64(WIDTH)), P.get(e)), vec)
            ch = cur()
            with b.if_then(b.icmp_unsigned("==", ch, c8(34))):
                b.branch(oafter)
            P.require(b.icmp_unsigned(">=", ch, c8(32)), fail)
            bs = b.icmp_unsigned("==", ch, c8(92))
            if has_esc is None:
                P.require(b.not_(bs), fail)
                P.inc(p)
            else:
                with b.if_then(bs):
                    P.set(has_esc, c8(1))
                P.inc(p, b.select(bs, c64(2), c64(1)))
        P.loop(lambda: ir.Constant(i1, 1), outer)

    def line_body(head, after):
        ln = P.get(line)
        P.set(p, b.load(b.gep(starts, [ln])))
        P.set(e, b.load(b.gep(stops, [ln])))
        base = b.mul(ln, kmax)
        c = P.var(c64(0))

        def clear(h, a):
            b.store(c64(-1), b.gep(vstart, [b.add(base, P.get(c))]))
            P.inc(c)
        P.loop(lambda: b.icmp_signed("<", P.get(c), kmax), clear)
        skip_ws()
        P.require(b.icmp_unsigned("==", cur(), c8(ord("{"))), fail)
        P.inc(p)
        skip_ws()

        def member(mhead, mafter):
            # "key"
            P.require(b.icmp_unsigned("==", cur(), c8(ord('"'))), fail)
            P.inc(p)
            ks = P.get(p)
            scan_string()
            klen = b.sub(P.get(p), ks)
            P.inc(p)
            # which column: the keys seen so far in this block, compared byte by byte
            col, j = P.var(c64(-1)), P.var(c64(0))

            def find(h, a):
                jj = P.get(j)
                kstart = b.load(b.gep(keys, [b.mul(jj, c64(2))]))
                klen_j = b.load(b.gep(keys, [b.add(b.mul(jj, c64(2)), c64(1))]))
                with b.if_then(b.icmp_signed("==", klen_j, klen)):
                    t, same = P.var(c64(0)), P.var(ir.Constant(i1, 1), i1)

                    def cmp(h2, a2):
                        tt = P.get(t)
                        x = b.load(b.gep(data, [b.add(kstart, tt)]))
                        y = b.load(b.gep(data, [b.add(ks, tt)]))
                        with b.if_then(b.icmp_unsigned("!=", x, y)):
                            P.set(same, ir.Constant(i1, 0))
                        P.inc(t)
                    P.loop(lambda: b.and_(P.get(same), b.icmp_signed("<", P.get(t), klen)), cmp)
                    with b.if_then(P.get(same)):
                        P.set(col, jj)
                P.inc(j)
            P.loop(lambda: b.and_(b.icmp_signed("<", P.get(j), P.get(nk)),
                                  b.icmp_signed("<", P.get(col), c64(0))), find)
            with b.if_then(b.icmp_signed("<", P.get(col), c64(0))):
                n_k = P.get(nk)
                full = P.f.append_basic_block()
                room = P.f.append_basic_block()
                b.cbranch(b.icmp_signed(">=", n_k, kmax), full, room)
                b.position_at_end(full)
                b.ret(c64(TOO_MANY_KEYS))
                b.position_at_end(room)
                b.store(ks, b.gep(keys, [b.mul(n_k, c64(2))]))
                b.store(klen, b.gep(keys, [b.add(b.mul(n_k, c64(2)), c64(1))]))
                b.store(c8(0), b.gep(kinds, [n_k]))
                P.set(col, n_k)
                P.set(nk, b.add(n_k, c64(1)))
            cc = P.get(col)
            slot = b.add(base, cc)
            P.require(b.icmp_signed("==", b.load(b.gep(vstart, [slot])), c64(-1)), fail)  # a key twice
            skip_ws()
            P.require(b.icmp_unsigned("==", cur(), c8(ord(":"))), fail)
            P.inc(p)
            skip_ws()
            kind_p = b.gep(kinds, [cc])
            with b.if_else(b.icmp_unsigned("==", cur(), c8(ord('"')))) as (then, otherwise):
                with then:  # a string: its bytes up to the closing quote, an escape's pair skipped
                    P.require(b.icmp_unsigned("!=", b.load(kind_p), c8(2)), fail)
                    b.store(c8(1), kind_p)
                    P.inc(p)
                    vs = P.get(p)
                    has_esc = P.var(c8(0), i8)
                    scan_string(has_esc)
                    b.store(vs, b.gep(vstart, [slot]))
                    b.store(P.get(p), b.gep(vval, [slot]))
                    b.store(P.get(has_esc), b.gep(esc, [slot]))
                    P.inc(p)
                with otherwise:  # an integer: -?(0|[1-9][0-9]*), at most MAX_DIGITS digits
                    P.require(b.icmp_unsigned("!=", b.load(kind_p), c8(1)), fail)
                    b.store(c8(2), kind_p)
                    neg = b.icmp_unsigned("==", cur(), c8(ord("-")))
                    P.inc(p, b.zext(neg, i64))
                    P.require(is_digit(cur()), fail)
                    ds = P.get(p)
                    val = P.var(c64(0))
                    with b.if_else(b.icmp_unsigned("==", cur(), c8(ord("0")))) as (zero, more):
                        with zero:
                            P.inc(p)
                        with more:
                            def digit(h, a):
                                d = b.zext(b.sub(cur(), c8(48)), i64)
                                P.set(val, b.add(b.mul(P.get(val), c64(10)), d))
                                P.inc(p)
                            P.loop(lambda: b.and_(is_digit(cur()),
                                                  b.icmp_signed("<=", b.sub(P.get(p), ds), c64(MAX_DIGITS))), digit)
                    P.require(b.icmp_signed("<=", b.sub(P.get(p), ds), c64(MAX_DIGITS)), fail)
                    nxt = cur()
                    P.require(b.and_(b.and_(b.icmp_unsigned("!=", nxt, c8(ord("."))),
                                            b.icmp_unsigned("!=", nxt, c8(ord("e")))),
                                     b.and_(b.icmp_unsigned("!=", nxt, c8(ord("E"))), b.not_(is_digit(nxt)))),
                              fail)
                    v = P.get(val)
                    b.store(ds, b.gep(vstart, [slot]))
                    b.store(b.select(neg, b.sub(c64(0), v), v), b.gep(vval, [slot]))
            skip_ws()
            ch = cur()
            comma = b.icmp_unsigned("==", ch, c8(ord(",")))
            with b.if_then(comma):
                P.inc(p)
                skip_ws()
                b.branch(mhead)
            P.require(b.icmp_unsigned("==", ch, c8(ord("}"))), fail)
            P.inc(p)
            b.branch(mafter)

        P.loop(lambda: ir.Constant(i1, 1), member)
        skip_ws()
        P.require(b.icmp_signed("==", P.get(p), P.get(e)), fail)
        P.inc(line)

    P.loop(lambda: b.icmp_signed("<", P.get(line), nlines), line_body)
    b.store(P.get(nk), nkeys)
    b.ret(c64(0))
    b.position_at_end(fail)
    b.ret(b.add(P.get(line), c64(1)))


def _gather(ir, mod) -> None:  # noqa: C901 - one kernel, written out as the loops it is
    """One string column's values copied out, escapes decoded to UTF-8 (module doc)."""
    i1, i8, i32, i64, c64, c8 = _types(ir)
    p8, p32, p64 = i8.as_pointer(), i32.as_pointer(), i64.as_pointer()
    G = _Fn(ir, mod, GATHER, i64, [p8, p64, p64, p8, i64, i64, i64, p8, p32])
    data, vstart, vval, esc, nlines, kmax, col, out, offsets = G.f.args
    b = G.b
    gfail = G.f.append_basic_block("fail")
    o, ln = G.var(c64(0)), G.var(c64(0))
    b.store(ir.Constant(i32, 0), offsets)
    table_t = ir.ArrayType(i8, 256)
    esc_table = ir.GlobalVariable(mod, table_t, name="guidealign_json_escapes")
    esc_table.global_constant = True
    esc_table.initializer = ir.Constant(table_t, [_ESCAPES.get(x, 0) for x in range(256)])

    def put(byte):
        b.store(byte, b.gep(out, [G.get(o)]))
        G.inc(o)

    def hex4(at):
        """The 4 hex digits at data[at:at+4] as a number; a byte that is not one fails."""
        v = G.var(c64(0))
        for t in range(4):
            ch = b.load(b.gep(data, [b.add(at, c64(t))]))
            dec = b.icmp_unsigned("<", b.sub(ch, c8(48)), c8(10))
            low = b.or_(ch, c8(0x20))  # A-F as a-f
            alpha = b.icmp_unsigned("<", b.sub(low, c8(97)), c8(6))
            G.require(b.or_(dec, alpha), gfail)
            d = b.select(dec, b.sub(ch, c8(48)), b.sub(low, c8(87)))
            G.set(v, b.or_(b.shl(G.get(v), c64(4)), b.zext(d, i64)))
        return G.get(v)

    def gather_line(h, a):
        slot = b.add(b.mul(G.get(ln), kmax), col)
        s = b.load(b.gep(vstart, [slot]))
        with b.if_then(b.icmp_signed(">=", s, c64(0))):
            end = b.load(b.gep(vval, [slot]))
            j = G.var(s)
            with b.if_else(b.icmp_unsigned("==", b.load(b.gep(esc, [slot])), c8(0))) as (plain, escaped):
                with plain:
                    def copy(h2, a2):
                        put(b.load(b.gep(data, [G.get(j)])))
                        G.inc(j)
                    G.loop(lambda: b.icmp_signed("<", G.get(j), end), copy)
                with escaped:
                    def dec(h2, a2):
                        ch = b.load(b.gep(data, [G.get(j)]))
                        with b.if_else(b.icmp_unsigned("!=", ch, c8(92))) as (lit, bs):
                            with lit:
                                put(ch)
                                G.inc(j)
                            with bs:  # the parse kept an escape's pair inside the string
                                x = b.load(b.gep(data, [b.add(G.get(j), c64(1))]))
                                G.inc(j, 2)
                                with b.if_else(b.icmp_unsigned("==", x, c8(ord("u")))) as (uni, simple):
                                    with simple:
                                        m = b.load(b.gep(esc_table, [c64(0), b.zext(x, i64)]))
                                        G.require(b.icmp_unsigned("!=", m, c8(0)), gfail)
                                        put(m)
                                    with uni:
                                        G.require(b.icmp_signed("<=", b.add(G.get(j), c64(4)), end), gfail)
                                        v = hex4(G.get(j))
                                        G.inc(j, 4)
                                        cp = G.var(v)
                                        G.require(b.not_(b.and_(b.icmp_signed(">=", v, c64(0xDC00)),
                                                                b.icmp_signed("<", v, c64(0xE000)))), gfail)
                                        high = b.and_(b.icmp_signed(">=", v, c64(0xD800)),
                                                      b.icmp_signed("<", v, c64(0xDC00)))
                                        with b.if_then(high):  # a surrogate pair: \\uD8xx\\uDCxx
                                            jj = G.get(j)
                                            G.require(b.icmp_signed("<=", b.add(jj, c64(6)), end), gfail)
                                            G.require(b.and_(
                                                b.icmp_unsigned("==", b.load(b.gep(data, [jj])), c8(92)),
                                                b.icmp_unsigned("==", b.load(b.gep(data, [b.add(jj, c64(1))])),
                                                                c8(ord("u")))), gfail)
                                            w = hex4(b.add(jj, c64(2)))
                                            G.require(b.and_(b.icmp_signed(">=", w, c64(0xDC00)),
                                                             b.icmp_signed("<", w, c64(0xE000))), gfail)
                                            G.inc(j, 6)
                                            G.set(cp, b.add(c64(0x10000), b.or_(
                                                b.shl(b.sub(v, c64(0xD800)), c64(10)), b.sub(w, c64(0xDC00)))))
                                        u = G.get(cp)

                                        def cont(x_):
                                            return b.trunc(b.or_(c64(0x80), b.and_(x_, c64(0x3F))), i8)
                                        with b.if_else(b.icmp_signed("<", u, c64(0x80))) as (one, multi):
                                            with one:
                                                put(b.trunc(u, i8))
                                            with multi:
                                                with b.if_else(b.icmp_signed("<", u, c64(0x800))) as (two, big):
                                                    with two:
                                                        put(b.trunc(b.or_(c64(0xC0), b.lshr(u, c64(6))), i8))
                                                        put(cont(u))
                                                    with big:
                                                        with b.if_else(b.icmp_signed("<", u, c64(0x10000))) as (three, four):
                                                            with three:
                                                                put(b.trunc(b.or_(c64(0xE0), b.lshr(u, c64(12))), i8))
                                                                put(cont(b.lshr(u, c64(6))))
                                                                put(cont(u))
                                                            with four:
                                                                put(b.trunc(b.or_(c64(0xF0), b.lshr(u, c64(18))), i8))
                                                                put(cont(b.lshr(u, c64(12))))
                                                                put(cont(b.lshr(u, c64(6))))
                                                                put(cont(u))
                    G.loop(lambda: b.icmp_signed("<", G.get(j), end), dec)
        G.inc(ln)
        b.store(b.trunc(G.get(o), i32), b.gep(offsets, [G.get(ln)]))

    G.loop(lambda: b.icmp_signed("<", G.get(ln), nlines), gather_line)
    b.ret(G.get(o))
    b.position_at_end(gfail)
    b.ret(c64(-1))
