"""Verbatim overlap by hashed 64-byte windows: near-duplicate documents, and leakage between splits.

A window (shingle) of `WINDOW` bytes that occurs in two texts is shared verbatim (Broder 1997).
Two uses:
- near-duplicates (`near_duplicates`): a document whose windows mostly occur in longer documents
  is a copy and is dropped; documents sharing a smaller part are linked, so the split puts them
  in the same split (as Lee et al. 2022 do for training data, with exact substrings);
- leakage (`contained_fraction`): the share of a held-out split's windows found in train.

Windows are compared on the UTF-8 bytes of the text, whatever the tokenizer. Every window of
every document is hashed at once with numpy: a polynomial hash mod 2^64 built by doubling
(h_2k[i] = h_k[i] * P^k + h_k[i + k]) and finished with the splitmix64 mixer. A large corpus
keeps only the windows whose hash is 0 mod `every` (Broder's mod-m sample): a shared window is
kept in both texts or in neither, so the fractions stay unbiased while memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WINDOW = 64  # bytes per shingle
MAX_WINDOWS = 1 << 24  # windows kept per corpus at most (128 MiB of hashes); beyond, sample 1 in `every`
DROP_AT = 0.8  # a document with >= 80% of its windows in longer documents is a copy: dropped
LINK_AT = 0.01  # documents sharing >= 1% of the shorter one's windows are split together
_CHUNK = 1 << 25  # bytes hashed per numpy pass (the uint64 temporaries are 8x this)
_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial hash


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the low bits used for sampling."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _hash_stream(data: np.ndarray, width: int) -> np.ndarray:
    """Hash of every `width`-byte window of a uint8 array: len(data) - width + 1 values."""
    n = len(data) - width + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    # res covers `got` bytes per window; pow_k = P^k for the current power-of-two block length k.
    block, k, pow_k = data.astype(np.uint64) + np.uint64(1), 1, _P
    res, got = None, 0
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        while True:
            if width & k:  # append a block of k bytes: res[i] * P^k + block[i + got]
                m = len(data) - got - k + 1
                res = block[:m].copy() if res is None else res[:m] * pow_k + block[got : got + m]
                got += k
            if 2 * k > width:
                break
            block = block[: len(block) - k] * pow_k + block[k:]  # windows of 2k bytes
            pow_k, k = pow_k * pow_k, 2 * k
    return _mix(res[:n])


def sample_rate(total_bytes: int) -> int:
    """`every` for a corpus of this many bytes: 1 (every window) up to MAX_WINDOWS windows."""
    return max(1, -(-total_bytes // MAX_WINDOWS))


def window_hashes(texts: Sequence[bytes], width: int = WINDOW, every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the windows inside each text (none crosses a text boundary), and each one's text index.

    With every > 1, only windows whose hash is 0 mod `every` are returned.
    """
    hashes, owners = [], []
    start = 0
    while start < len(texts):  # texts in chunks of about _CHUNK bytes, hashed as one stream
        stop, size = start, 0
        while stop < len(texts) and (size == 0 or size + len(texts[stop]) <= _CHUNK):
            size += len(texts[stop])
            stop += 1
        lengths = np.fromiter((len(t) for t in texts[start:stop]), np.int64, stop - start)
        stream = np.frombuffer(b"".join(texts[start:stop]), np.uint8)
        h = _hash_stream(stream, width)
        doc = np.repeat(np.arange(start, stop), lengths)[: len(h)]
        ends = np.cumsum(lengths)[doc - start]
        keep = np.arange(len(h)) + width <= ends  # the window ends inside its own text
        if every > 1:
            keep &= h % np.uint64(every) == 0
        hashes.append(h[keep])
        owners.append(doc[keep])
        start = stop
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(hashes), np.concatenate(owners)


def contained_fraction(query: Sequence[bytes], reference: Sequence[bytes], every: int = 1) -> float:
    """Share of the query texts' windows (counted with repeats) that occur anywhere in the reference."""
    q, _ = window_hashes(query, every=every)
    if len(q) == 0:
        return 0.0
    r, _ = window_hashes(reference, every=every)
    if len(r) == 0:
        return 0.0
    r.sort()  # np.isin and the hash-based np.unique are many times slower on uint64
    found = r[np.searchsorted(r, q).clip(max=len(r) - 1)] == q
    return float(found.mean())


def near_duplicates(
    texts: Sequence[bytes], every: int = 1, drop_at: float = DROP_AT, link_at: float = LINK_AT
) -> tuple[np.ndarray, np.ndarray]:
    """Which texts to keep, and a group id per text: texts of one group go to the same split.

    Each distinct window belongs to the longest text containing it. A text with at least
    `drop_at` of its distinct windows belonging to longer texts is a copy (say, a topic that
    a larger page repeats) and is dropped. A text with at least `link_at` of its windows in a
    longer one joins that one's group (connected components, so groups chain).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(texts)
    rank = np.empty(n, np.int64)  # 0 = longest; ties by position, so the result is deterministic
    rank[np.argsort([-len(t) for t in texts], kind="stable")] = np.arange(n)
    h, doc = window_hashes(texts, every=every)
    order = np.lexsort((rank[doc], h))  # by hash, then longest text first
    h, doc = h[order], doc[order]
    distinct = np.ones(len(h), bool)  # first (hash, text) of each repeat within a text
    distinct[1:] = (h[1:] != h[:-1]) | (doc[1:] != doc[:-1])
    h, doc = h[distinct], doc[distinct]
    first = np.ones(len(h), bool)
    first[1:] = h[1:] != h[:-1]
    owner = doc[np.flatnonzero(first)[np.cumsum(first) - 1]]  # the longest text holding each window
    windows = np.bincount(doc, minlength=n)
    foreign = owner != doc
    contained = np.bincount(doc[foreign], minlength=n)
    keep = ~((windows > 0) & (contained >= drop_at * np.maximum(windows, 1)))

    pairs, shared = np.unique(doc[foreign] * n + owner[foreign], return_counts=True)
    a, b = pairs // n, pairs % n
    linked = (shared >= link_at * windows[a]) & keep[a] & keep[b]
    graph = coo_matrix((np.ones(int(linked.sum())), (a[linked], b[linked])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    return keep, group
