"""blake2b with an 8-byte digest over every string of an Arrow string array, compiled with numba.

``hashlib.blake2b(s, digest_size=8)`` costs ~0.7 us a call from Python, mostly call overhead;
ingest hashes every prompt, so that loop was the largest cost of the columnar path. This is the
same function (RFC 7693, unkeyed, 8-byte output) run over the array's offsets and data buffers in
compiled code, on all cores, without the GIL. ``out[i]`` is the digest read as a little-endian
uint64, i.e. ``int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")``; the tests
check it against hashlib. Import this module only when numba is installed (vLLM depends on it);
numba caches the machine code in ``__pycache__``, so only the first run on a machine compiles.
"""
import numba
import numpy as np
from numba import njit, prange

u64 = numba.uint64
IV = np.array([0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
               0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179],
              dtype=np.uint64)
SIGMA = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0]], dtype=np.int64)


@njit(cache=True)
def _rotr(x, n):
    return (x >> u64(n)) | (x << u64(64 - n))


@njit(cache=True)
def _g(v, a, b, c, d, x, y):
    v[a] = v[a] + v[b] + x
    v[d] = _rotr(v[d] ^ v[a], 32)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 24)
    v[a] = v[a] + v[b] + y
    v[d] = _rotr(v[d] ^ v[a], 16)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 63)


@njit(cache=True)
def _compress(h, v, m, data, start, stop, t, last):
    for w in range(16):  # message words: little-endian, zero-padded past ``stop``
        x = u64(0)
        for k in range(8):
            p = start + w * 8 + k
            if p < stop:
                x |= u64(data[p]) << u64(8 * k)
        m[w] = x
    for i in range(8):
        v[i] = h[i]
        v[i + 8] = IV[i]
    v[12] ^= u64(t)
    if last:
        v[14] = ~v[14]
    for r in range(12):
        s = SIGMA[r % 10]
        _g(v, 0, 4, 8, 12, m[s[0]], m[s[1]])
        _g(v, 1, 5, 9, 13, m[s[2]], m[s[3]])
        _g(v, 2, 6, 10, 14, m[s[4]], m[s[5]])
        _g(v, 3, 7, 11, 15, m[s[6]], m[s[7]])
        _g(v, 0, 5, 10, 15, m[s[8]], m[s[9]])
        _g(v, 1, 6, 11, 12, m[s[10]], m[s[11]])
        _g(v, 2, 7, 8, 13, m[s[12]], m[s[13]])
        _g(v, 3, 4, 9, 14, m[s[14]], m[s[15]])
    for i in range(8):
        h[i] ^= v[i] ^ v[i + 8]


@njit(parallel=True, nogil=True, cache=True)
def _kernel(offsets, data, out):
    n = offsets.shape[0] - 1
    chunks = (n + 1023) // 1024
    for c in prange(chunks):
        h = np.empty(8, dtype=np.uint64)
        v = np.empty(16, dtype=np.uint64)
        m = np.empty(16, dtype=np.uint64)
        for i in range(c * 1024, min(n, c * 1024 + 1024)):
            for k in range(8):
                h[k] = IV[k]
            h[0] ^= u64(0x01010008)  # digest length 8, no key, fanout 1, depth 1
            a, b = offsets[i], offsets[i + 1]
            if b == a:
                _compress(h, v, m, data, a, a, 0, True)
            else:
                pos = a
                while b - pos > 128:
                    _compress(h, v, m, data, pos, pos + 128, pos + 128 - a, False)
                    pos += 128
                _compress(h, v, m, data, pos, b, b - a, True)
            out[i] = h[0]


def blake2b64(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint64 blake2b-64 of ``data[offsets[i]:offsets[i+1]]`` for each i."""
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    if len(out):
        _kernel(np.ascontiguousarray(offsets, dtype=np.int64), data, out)
    return out
