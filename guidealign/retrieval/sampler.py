"""The retriever's batch sampler: batches with no text twice and no false in-batch negative
(a pair whose guideline is also a guideline of another pair's prompt in the batch)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def no_false_negatives_sampler(positives_of: dict[str, set[str]]):
    """A batch sampler class (for ``batch_sampler=``) that extends the no-duplicates one:
    besides no text twice in a batch, no pair whose guideline is one of the guidelines of
    another pair's prompt. A prompt has several guidelines and a guideline serves many
    prompts, so with (A, g1) and (B, g2) in one batch while g2 is also A's guideline, the
    loss would push A away from its own guideline g2 (a false in-batch negative).
    ``positives_of``: prompt text -> the texts of all its guidelines (train pairs).

    Every pair is in exactly one batch of each epoch (with ``drop_last=False``, what the trainer
    here uses), and ``len()`` is the number of batches an epoch yields at most: the trainer takes
    exactly ``len()`` batches an epoch, and the stock sampler advertises ceil(pairs / batch size)
    while a pass that defers conflicting pairs yields more (the pairs of the last ones were never
    trained on). The length is that of epoch 0's pass; a later epoch whose pass comes out longer
    folds the pairs of its surplus batches into the first ``len()`` batches where they do not
    conflict (a batch may then hold a pair or two more; a pair that fits none, even after one
    swap, sits that epoch out, logged); one whose pass comes out shorter has its largest batches
    split until it yields ``len()`` (the trainer's resume position assumes it). ``drop_last=True`` drops every incomplete batch of a pass
    (not only the last one: a batch ends incomplete wherever the remaining pairs all conflict
    with it), folds only into batches with room (none: they are full) and is an error when no
    full batch can be made at all."""
    import torch
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    # the latest pass, shared by the class's instances: run_train_retriever's check and the
    # trainer's own sampler (same pairs, seed and batch size) shuffle and batch epoch 0 once
    passes: dict[tuple, list[list[int]]] = {}

    class NoFalseNegativesBatchSampler(NoDuplicatesBatchSampler):
        def _values(self):
            anchors, positives = list(self.dataset["anchor"]), list(self.dataset["positive"])

            def values(i: int) -> set:
                a, p = anchors[i], positives[i]
                # ("t", x): a text of a pair in the batch (either column); ("own", g): a
                # guideline of a prompt in the batch
                return {("t", a), ("t", p)} | {("own", g) for g in positives_of.get(a, ())}
            return values

        @staticmethod
        def _overlap(v: set, batch: set) -> bool:
            for kind, x in v:
                if kind == "t" and (("t", x) in batch or ("own", x) in batch):
                    return True  # a text twice, or its guideline is another prompt's
                if kind == "own" and ("t", x) in batch:
                    return True  # a guideline in the batch is one of its prompt's
            return False

        def _pass(self, epoch: int) -> list[list[int]]:
            """The batches of one pass over the pairs, shuffled for ``epoch`` (the last one is
            kept: the trainer asks the length before epoch 0 and then iterates it)."""
            # unseeded, a shuffle is this instance's own
            seed = self.seed if self.seed is not None else ("unseeded", id(self))
            key = (len(self.dataset), self.batch_size, self.drop_last, seed, epoch)
            if key not in passes:
                if self.generator is None:
                    self.generator = torch.Generator()
                if self.seed is not None:
                    self.generator.manual_seed(self.seed + epoch)
                passes.clear()
                passes[key] = list(self._one_pass(self._values(), self._overlap))
            return passes[key]

        def _one_pass(self, values, overlap):
            """One shuffled pass, batch by batch: a batch takes, in shuffled order, every pair that
            conflicts with none already in it, until it is full; the others wait, in their order,
            for the next batch. (The greedy pass of sentence-transformers' own sampler, written
            here: its method for it is private and absent before 6.3, where training failed.)
            The pairs still to place are a linked list over the shuffled order, so a batch costs
            the pairs it looks at, not a copy of all the rest."""
            n = len(self.dataset)
            dtype = torch.int32 if n < 2**31 else torch.int64  # the permutation its sampler draws
            order = torch.randperm(n, generator=self.generator, dtype=dtype).tolist()
            after = list(range(1, n + 1))  # after[k]: the next waiting position; n ends the list
            head = 0
            while head < n:
                batch, taken = [], set()
                prev, k = -1, head
                while k < n:
                    nxt = after[k]
                    v = values(order[k])
                    if overlap(v, taken):
                        prev = k  # stays in the list, for a later batch
                    else:
                        batch.append(order[k])
                        taken |= v
                        if prev < 0:
                            head = nxt
                        else:
                            after[prev] = nxt
                        if len(batch) == self.batch_size:
                            break
                    k = nxt
                if len(batch) == self.batch_size or not self.drop_last:
                    yield batch

        def __len__(self) -> int:
            if "_len" not in self.__dict__:
                n = len(self._pass(0))
                if n == 0 and len(self.dataset):
                    # the trainer reads a length of 0 as "no length" and asks for max_steps
                    raise ValueError(
                        f"no batch of {self.batch_size} pairs without a text twice or a false in-batch "
                        f"negative can be made from these {len(self.dataset)} pairs, and drop_last drops "
                        "every smaller one: lower the batch size or set drop_last=False")
                self._len = n
            return self._len

        def __iter__(self):
            n = len(self)
            batches = self._pass(self.epoch)
            if len(batches) > n:
                batches = self._fold(batches, n)
            elif len(batches) < n:
                batches = self._split(batches, n)
            yield from batches

        @staticmethod
        def _split(batches: list[list[int]], n: int) -> list[list[int]]:
            """``n`` batches from a shorter pass: the largest split in two (halves of a batch
            conflict no more than it did) until there are ``n``. The trainer counts epochs as
            ``len()`` batches: an epoch of fewer put a resumed run's position at the wrong
            batch (it trained some twice and ended on another step than the uninterrupted run)."""
            out = [list(b) for b in batches]
            while len(out) < n:
                k = max(range(len(out)), key=lambda j: len(out[j]))
                if len(out[k]) < 2:
                    break  # cannot happen: epoch 0's pass had as many pairs in n batches
                half = len(out[k]) // 2
                out[k:k + 1] = [out[k][:half], out[k][half:]]
            return out

        def _fold(self, batches: list[list[int]], n: int) -> list[list[int]]:
            """The first ``n`` batches with the pairs of the others folded into them: into a
            batch they do not conflict with (the shortest), else after moving the one pair they
            conflict with there to another batch. Only the ``n`` batches the trainer takes are
            filled (a pair put past them would never be trained on), and with ``drop_last`` a
            batch stays at ``batch_size``; a pair that fits none sits this epoch out."""
            values = self._values()
            keep = [list(b) for b in batches[:n]]

            def union(b: list[int]) -> set:
                return set().union(*(values(j) for j in b))

            seen = [union(b) for b in keep]
            cap = self.batch_size if self.drop_last else None

            def fits(v: set, skip: int = -1) -> list[int]:
                return [k for k in range(n) if k != skip and (cap is None or len(keep[k]) < cap)
                        and not self._overlap(v, seen[k])]

            def put(i: int, k: int) -> None:
                keep[k].append(i)
                seen[k] |= values(i)

            left = 0
            for i in (i for b in batches[n:] for i in b):
                v = values(i)
                ks = fits(v)
                if ks:
                    put(i, min(ks, key=lambda k: len(keep[k])))
                    continue
                # one swap: a batch where i conflicts with a single pair that fits elsewhere
                for k in range(n):
                    clash = [j for j in keep[k] if self._overlap(v, values(j))]
                    if len(clash) == 1 and (to := fits(values(clash[0]), skip=k)):
                        keep[k].remove(clash[0])
                        seen[k] = union(keep[k])
                        put(clash[0], min(to, key=lambda t: len(keep[t])))
                        put(i, k)
                        break
                else:  # not trained on this epoch (the trainer takes n batches)
                    left += 1
            if left:
                log.warning("retriever: %d pair(s) conflict with every batch of epoch %d and sit it out",
                            left, self.epoch)
            return keep

    return NoFalseNegativesBatchSampler
