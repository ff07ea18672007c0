"""N-gram floors: the val loss of smoothed 1- to 4-gram models counted on the train split.

A model that does not beat these has learned no more than n-gram statistics, whatever its
architecture. The models are interpolated Kneser-Ney (Kneser & Ney 1995; the interpolated form
of Chen & Goodman 1998, section 3.5) with one absolute discount per order,
D = n1 / (n1 + 2 n2) from that order's counts of counts, and the uniform distribution over the
vocabulary below the unigram, so no token gets probability zero:

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .) + D_k N1+(h .) / c_k(h .) * P_{k-1}(w | h')

where h' drops the oldest token of h; c_k is the raw count at the model's own order and the
continuation count N1+(. h w) (distinct left neighbours) below it; a context never seen in
train falls through to P_{k-1}. Every order scores the same targets (the val tokens from the
4th on), in nats per token. Counting is vectorised: each k-gram is one integer code
(sum of t_j V^j; above 2^64 the code wraps and acts as a hash), looked up in sorted tables.
"""

from __future__ import annotations

import numpy as np

MAX_ORDER = 4
MAX_TRAIN_TOKENS = 1 << 25  # ~33.5M, what a GPU-budget run reads (2000 x 64 x 256 = 32.8M)
MAX_VAL_TOKENS = 1 << 22


class _Table:
    """Sorted codes with a value each; `get` looks many codes up at once (0 where absent)."""

    def __init__(self, codes: np.ndarray, values: np.ndarray):
        self.codes, self.values = codes, values.astype(np.float64)

    def get(self, query: np.ndarray) -> np.ndarray:
        if len(self.codes) == 0:
            return np.zeros(len(query))
        i = np.searchsorted(self.codes, query).clip(max=len(self.codes) - 1)
        return np.where(self.codes[i] == query, self.values[i], 0.0)


class _Level:
    """One order of a model: counts of k-grams, and per context (the k-gram's first k-1 tokens)
    the sum of those counts and the number of distinct continuations."""

    def __init__(self, grams: np.ndarray, counts: np.ndarray, contexts: np.ndarray):
        self.grams = _Table(grams, counts)
        order = np.argsort(contexts, kind="stable")
        ctx, first = np.unique(contexts[order], return_index=True)
        self.total = _Table(ctx, np.add.reduceat(counts[order], first))
        self.types = _Table(ctx, np.diff(np.append(first, len(order))))
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        # Too few singletons or doubletons to estimate D (tiny corpora): 0.5.
        self.discount = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def _codes(tokens: np.ndarray, vocab_size: int, max_order: int) -> list[np.ndarray]:
    """codes[k - 1][i]: the code of the k-gram starting at position i."""
    t = tokens.astype(np.uint64)
    out = [t]
    with np.errstate(over="ignore"):
        for k in range(1, max_order):
            out.append(out[-1][:-1] * np.uint64(vocab_size) + t[k:])
    return out


def _levels(train: np.ndarray, vocab_size: int, max_order: int) -> tuple[list[_Level], list[_Level]]:
    """Per order k = 1..max_order: the raw-count level, and (k < max_order) the continuation level."""
    tc = _codes(train, vocab_size, max_order)

    def context(k: int, positions: np.ndarray) -> np.ndarray:  # the (k-1)-gram starting there
        return tc[k - 2][positions] if k > 1 else np.zeros(len(positions), np.uint64)

    raw, cont = [], []
    for k in range(1, max_order + 1):
        grams, at, counts = np.unique(tc[k - 1], return_index=True, return_counts=True)
        raw.append(_Level(grams, counts, context(k, at)))
        if k < max_order:  # N1+(. w): the distinct (k+1)-grams ending in each k-gram
            _, ext_at = np.unique(tc[k], return_index=True)
            grams, first, counts = np.unique(tc[k - 1][ext_at + 1], return_index=True, return_counts=True)
            cont.append(_Level(grams, counts, context(k, ext_at[first] + 1)))
    return raw, cont


def kneser_ney_floors(
    train: np.ndarray, val: np.ndarray, vocab_size: int, max_order: int = MAX_ORDER
) -> dict[int, float]:
    """{n: val loss in nats/token of the interpolated Kneser-Ney n-gram model of `train`}, n = 1..max_order.

    Uses at most MAX_TRAIN_TOKENS of train and MAX_VAL_TOKENS of val (their beginnings; the
    splits are in shuffled document order, so a beginning is a sample of documents).
    """
    train, val = train[:MAX_TRAIN_TOKENS], val[:MAX_VAL_TOKENS]
    if len(val) < max_order or len(train) < max_order + 1:
        return {}
    raw, cont = _levels(train, vocab_size, max_order)
    vc = _codes(val, vocab_size, max_order)
    n_scored = len(val) - (max_order - 1)  # targets val[max_order-1:], the same for every order
    floors = {}
    for n in range(1, max_order + 1):
        p = np.full(n_scored, 1.0 / vocab_size)  # P_0: uniform
        for k in range(1, n + 1):
            level = raw[k - 1] if k == n else cont[k - 1]
            start = max_order - k  # the k-gram ending at each target starts k-1 tokens before it
            gram = vc[k - 1][start : start + n_scored]
            ctx = vc[k - 2][start : start + n_scored] if k > 1 else np.zeros(n_scored, np.uint64)
            total, types, count = level.total.get(ctx), level.types.get(ctx), level.grams.get(gram)
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            mixed = np.maximum(count - level.discount, 0) / safe + level.discount * types / safe * p
            p = np.where(seen, mixed, p)
        floors[n] = float(-np.log(p).mean())
    return floors
