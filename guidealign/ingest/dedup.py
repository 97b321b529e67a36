"""Exact de-duplication of 64-bit prompt hashes in bounded memory (``HashSet``).

The set answers, for a block of hashes, which ones it has not seen, and adds them. It keeps:

- a bit filter (a blocked Bloom filter, 8-24 bits a hash: 1-3 bytes a distinct prompt), so most
  new hashes are known new without a search; only those it cannot rule out (~0.2-4% of the new
  ones, plus the real repeats) are looked up;
- the newest hashes as sorted uint64 runs in memory, up to ``memory_hashes`` of them;
- older hashes as sorted runs in anonymous temporary files (``spill_dir``), each with every
  ``FENCE``-th value in memory (1/64 of its size): a lookup reads the one 64-value window (512
  bytes) a candidate can be in, so the files never count as this process's memory.

Runs of both kinds merge while the newest is at least half the size of the one before it, so
there are O(log n) of them and each hash is rewritten O(log n) times. Memory for 10M distinct
prompts: 16 MiB of filter, ``memory_hashes`` * 8 bytes of runs, ~1.2 MiB of fences (against
76 MiB for all hashes in memory); the temp files hold 8 bytes a prompt (16 while two merge) and
vanish with the process, however it ends.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

FENCE = 64                 # values per window of a run on disk; its first one stays in memory
MERGE_CHUNK = 1 << 18      # values read from a file per step of a merge or a scan (2 MiB)
LOOKUP_CHUNK = 4096        # windows read per buffer (2 MiB)
SCAN_EVERY = 16            # a file is read through when candidates are >= 1/16 of its windows
_U64 = np.dtype(np.uint64)
EXPECTED_MAX = 1 << 24     # hashes a filter is sized for up front, at most (a 32 MiB filter)


def hashes_in_mib(mib: int) -> int:
    """How many 8-byte hashes ``mib`` MiB holds (``ingest.dedup_memory_mib`` -> ``memory_hashes``)."""
    return mib << 17


class HashSet:
    """Set of 64-bit hashes (uniform: blake2b of the normalized prompt); see the module doc."""

    def __init__(self, memory_hashes: int = 1 << 20, spill_dir: str | Path | None = None, expected: int = 0):
        """``expected``: about how many hashes will come (0: unknown). The bit filter is sized for
        them from the start (up to ``EXPECTED_MAX``), not rebuilt from every hash each time it
        fills: 1M hashes took 7 rebuilds, ~20 ms. An estimate that is too low costs rebuilds
        later, as without one; one too high, filter memory (1.5 bytes a hash it is sized for)."""
        self.memory_hashes = max(1, int(memory_hashes))
        self.expected = min(max(0, int(expected)), EXPECTED_MAX)
        # a memory run stops merging at a quarter of the budget, so a merge needs at most that
        self.max_run = max(1, self.memory_hashes // 4)
        self.spill_dir = spill_dir
        self.runs: list[np.ndarray] = []       # in memory, oldest first
        self.disk: list[_DiskRun] = []         # in temp files, oldest first
        self.n = 0
        self.filter = _BitFilter(self.expected)

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> HashSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory_bytes(self) -> int:
        """Bytes the set holds in memory now (filter, runs, fences)."""
        return (self.filter.words.nbytes + sum(r.nbytes for r in self.runs)
                + sum(d.fences.nbytes for d in self.disk))

    def disk_bytes(self) -> int:
        return 8 * sum(d.n for d in self.disk)

    def close(self) -> None:
        """Free the temp files; the set is empty after (and can be used again)."""
        disk, self.disk = self.disk, []
        self.runs, self.n, self.filter = [], 0, _BitFilter(self.expected)
        err = None
        for d in disk:
            try:
                d.file.close()
            except OSError as e:
                err = err or e
        if err is not None:
            raise err

    def add_new(self, h: np.ndarray) -> np.ndarray:
        """Mask of the uint64 hashes in ``h`` (in order) that were not in the set (the first
        occurrence within ``h`` counts as new); adds them."""
        if h.dtype != _U64:
            raise TypeError(f"HashSet.add_new takes uint64 hashes, got {h.dtype}")
        if not h.size:
            return np.zeros(0, dtype=bool)
        s = np.sort(h)  # no argsort: positions only for the few values seen before or repeated
        rep = s[1:] == s[:-1]
        repeats = bool(rep.any())
        run = s[np.concatenate([[True], ~rep])] if repeats else s
        seen = self._contains(run)
        new = ~_isin_sorted(h, run[seen])
        if repeats:  # repeats within h: the first occurrence is new, the others are not
            cand = np.flatnonzero(_isin_sorted(h, _distinct_sorted(s[1:][rep])) & new)
            first = _first_of_each(h[cand])
            later = np.ones(cand.size, dtype=bool)
            later[first] = False
            new[cand[later]] = False
        run = run[~seen]
        if run.size:
            self._add_run(run)
        return new

    def _contains(self, run: np.ndarray) -> np.ndarray:
        """Which of the sorted, distinct ``run`` are in the set."""
        seen = np.zeros(run.size, dtype=bool)
        if not self.n:
            return seen
        maybe = np.flatnonzero(self.filter.test(run))
        if not maybe.size:
            return seen
        cand = run[maybe]
        found = np.zeros(cand.size, dtype=bool)
        for r in self.runs:
            found |= _in_sorted(r, cand)
        for d in reversed(self.disk):  # newest first: the smaller files
            rest = np.flatnonzero(~found)
            if not rest.size:
                break
            found[rest] = d.contains(cand[rest])
        seen[maybe] = found
        return seen

    def _add_run(self, run: np.ndarray) -> None:
        n = self.n + run.size
        if n > self.filter.capacity:
            # built beside the old one, which stays if this fails (a MemoryError, a read error):
            # every step below leaves the set whole, with or without this run
            new = _BitFilter(n)
            for chunk in self._chunks():
                new.add(chunk)
            self.filter = new
        self.filter.add(run)
        runs = self.runs
        runs.append(run)
        self.n = n
        while len(runs) > 1 and runs[-1].size * 2 >= runs[-2].size and runs[-2].size < self.max_run:
            merged = np.concatenate(runs[-2:])
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
            runs[-2:] = [merged]
        if sum(r.size for r in runs) >= self.memory_hashes:
            self._spill()

    def _spill(self) -> None:
        """Move the memory runs to temp files, oldest first, merging files as runs merge."""
        while self.runs:
            self.disk.append(_DiskRun.write(self.runs[0], self.spill_dir))
            self.runs.pop(0)
            while len(self.disk) > 1 and self.disk[-1].n * 2 >= self.disk[-2].n:
                self.disk.append(_DiskRun.merge(self.disk[-2], self.disk[-1], self.spill_dir))
                del self.disk[-3:-1]

    def _chunks(self) -> Iterator[np.ndarray]:
        """Every hash in the set, in sorted chunks (files read a chunk at a time)."""
        for d in self.disk:
            yield from d.chunks()
        yield from self.runs


def _in_sorted(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    j = np.searchsorted(r, x)
    j[j == r.size] = 0
    return r[j] == x


class _BitFilter:
    """Blocked Bloom filter: each hash sets three bits (picked by its low 18 bits) of the 64-bit
    word its top bits pick, so a hash with any of them clear was never added. False positives:
    ~4% when full (8 bits a hash), ~1% at 12, ~0.2% at 24.

    Sorted hashes pick ascending words, so adding is a grouped OR (``reduceat``: no repeated
    index in one fancy assignment) and testing a gather that walks memory in order. Sized for
    ``capacity`` hashes (8 bits a hash); the set builds a larger one when it fills (12-24 bits a
    hash when built)."""

    def __init__(self, n: int):
        self.log2 = min(40, max(20, (max(1, n) * 12).bit_length()))  # bits
        self.capacity = (1 << self.log2) // 8 if self.log2 < 40 else float("inf")
        self.words = np.zeros(1 << (self.log2 - 6), dtype=_U64)
        self.shift = np.uint64(64 - (self.log2 - 6))

    def _probe(self, h: np.ndarray):
        """(word index, three-bit mask) of each hash; ascending indices for sorted ``h``."""
        one, six = np.uint64(1), np.uint64(63)
        mask = (one << (h & six)) | (one << ((h >> np.uint64(6)) & six)) | (one << ((h >> np.uint64(12)) & six))
        return (h >> self.shift).astype(np.intp), mask

    def add(self, h: np.ndarray) -> None:
        """Add ``h``, which must be sorted (equal words adjacent, ORed together first)."""
        if not h.size:
            return
        word, mask = self._probe(h)
        starts = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
        self.words[word[starts]] |= np.bitwise_or.reduceat(mask, starts)

    def test(self, h: np.ndarray) -> np.ndarray:
        word, mask = self._probe(h)
        return (self.words[word] & mask) == mask


@dataclass
class _DiskRun:
    """A sorted run of distinct hashes in an anonymous temp file, and its fences (every
    ``FENCE``-th value, from the first)."""

    file: BinaryIO
    n: int
    fences: np.ndarray

    @classmethod
    def write(cls, run: np.ndarray, spill_dir) -> _DiskRun:
        w = _RunWriter(spill_dir)
        w.append(run)
        return w.finish()

    @classmethod
    def merge(cls, a: _DiskRun, b: _DiskRun, spill_dir) -> _DiskRun:
        """One run of ``a`` and ``b`` (disjoint: the set adds only unseen hashes), streamed a chunk
        of each at a time; closes both."""
        w = _RunWriter(spill_dir)
        ia, ib = a.chunks(), b.chunks()
        x, y = next(ia, None), next(ib, None)
        while x is not None and y is not None:
            cut = min(x[-1], y[-1])  # everything up to here from both is known: merge and write
            i, j = np.searchsorted(x, cut, "right"), np.searchsorted(y, cut, "right")
            m = np.concatenate([x[:i], y[:j]])
            m.sort(kind="stable")
            w.append(m)
            x, y = x[i:], y[j:]
            if not x.size:
                x = next(ia, None)
            if not y.size:
                y = next(ib, None)
        for rest, it in ((x, ia), (y, ib)):
            while rest is not None:
                w.append(rest)
                rest = next(it, None)
        a.file.close()
        b.file.close()
        return w.finish()

    def chunks(self) -> Iterator[np.ndarray]:
        self.file.seek(0)
        for start in range(0, self.n, MERGE_CHUNK):
            k = min(MERGE_CHUNK, self.n - start)
            buf = self.file.read(k * 8)
            if len(buf) != k * 8:
                raise OSError(f"de-dup spill file: read {len(buf)} of {k * 8} bytes")
            yield np.frombuffer(buf, dtype=_U64)

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Which of the sorted ``x`` are in this run.

        Few candidates: each is compared with the one window (``FENCE`` values) it can be in,
        read with ``preadv`` (a mapping would put whole cached folios, up to 2 MiB a touched
        window, in this process's resident set). Many (1/``SCAN_EVERY`` of the windows or more):
        the file is read through a chunk at a time instead, a read per 2 MiB, not a call per window."""
        out = np.zeros(x.size, dtype=bool)
        w = np.searchsorted(self.fences, x, "right").astype(np.intp) - 1  # -1: below the first
        ok = np.flatnonzero(w >= 0)
        if not ok.size:
            return out
        if ok.size * SCAN_EVERY >= self.fences.size:
            for chunk in self.chunks():
                lo, hi = np.searchsorted(x, chunk[0]), np.searchsorted(x, chunk[-1], "right")
                if hi > lo:
                    out[lo:hi] = _in_sorted(chunk, x[lo:hi])
            return out
        for start in range(0, ok.size, LOOKUP_CHUNK):
            sel = ok[start:start + LOOKUP_CHUNK]
            out[sel] = self._in_windows(w[sel], x[sel])
        return out

    def _in_windows(self, wins: np.ndarray, xs: np.ndarray) -> np.ndarray:
        size = FENCE * 8
        buf = np.empty((wins.size, FENCE), dtype=_U64)
        view = memoryview(buf).cast("B")
        fd = self.file.fileno()
        for k, win in enumerate(wins.tolist()):
            want = min(size, 8 * self.n - win * size)  # the last window may be partial
            got = 0
            while got < want:  # a short read is not the end of the file (NFS, FUSE may do it)
                r = os.preadv(fd, [view[k * size + got:k * size + want]], win * size + got)
                if r <= 0:
                    raise OSError(f"de-dup spill file: read {got} of {want} bytes at window {win}")
                got += r
            if want < size:  # pad with a value of the window (it is in the run)
                buf[k, want // 8:] = buf[k, 0]
        return (buf == xs[:, None]).any(axis=1)


class _RunWriter:
    """Appends sorted chunks to a new temp file and collects the fences."""

    def __init__(self, spill_dir):
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        # anonymous where the file system allows (O_TMPFILE), else unlinked at once: gone with
        # the process however it ends
        self.file = tempfile.TemporaryFile(prefix=".dedup-", dir=spill_dir)
        self.n = 0
        self.fences: list[np.ndarray] = []

    def append(self, chunk: np.ndarray) -> None:
        if not chunk.size:
            return
        first = (-self.n) % FENCE  # index in chunk of the next fence value
        self.fences.append(chunk[first::FENCE].copy())
        self.file.write(np.ascontiguousarray(chunk, dtype=_U64).data)
        self.n += chunk.size

    def finish(self) -> _DiskRun:
        self.file.flush()  # lookups read the file itself, not Python's buffer
        fences = np.concatenate(self.fences) if self.fences else np.zeros(0, dtype=_U64)
        return _DiskRun(self.file, self.n, fences)


def _distinct_sorted(x: np.ndarray) -> np.ndarray:
    """The distinct values of the sorted ``x`` (``np.unique``, which also imports numpy.ma:
    ~3 ms of the first block's time)."""
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if x.size else x


def _first_of_each(v: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of each distinct value of ``v``, in the values' order
    (``np.unique(v, return_index=True)[1]``)."""
    order = np.argsort(v, kind="stable")  # equal values keep their order: the first comes first
    return order[np.concatenate([[True], v[order][1:] != v[order][:-1]])] if v.size else order


def _isin_sorted(h: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of the entries of ``h`` that are in the sorted array ``values`` (few, usually).

    The hashes are uniform, so a table of their low bits rules out most of ``h`` in one cheap
    gather; only the rest is binary-searched."""
    if not values.size:
        return np.zeros(h.size, dtype=bool)
    bits = min(20, max(12, int(values.size).bit_length() + 4))
    low = np.uint64((1 << bits) - 1)
    table = np.zeros(1 << bits, dtype=bool)
    table[values & low] = True
    out = table[h & low]
    cand = np.flatnonzero(out)
    if cand.size:
        out[cand] = _in_sorted(values, h[cand])
    return out
