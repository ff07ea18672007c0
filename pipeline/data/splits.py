"""Documents -> token arrays -> train/val/test, split so that held-out text is not in train.

Near-duplicate documents are dropped or kept together (pipeline.data.overlap) before the split,
for every source; the verbatim overlap that remains and the n-gram floors are measured here,
once per corpus, and cached with the tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import ngram, overlap
from pipeline.data.config import SPLITS, DataConfig, DataConfigError
from pipeline.data.sources import get_source
from pipeline.data.tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

# TokenSplits fields saved with the tokens (pipeline.data.cache).
META = ("vocab_size", "tokenizer", "eos_id", "split_by", "documents", "dropped", "overlap", "floors", "tokens")


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab_size: int
    cache_hit: bool = False  # True when all splits came from the on-disk cache
    cache_path: Path | None = None
    tokenizer: str = "byte"
    eos_id: int | None = None
    split_by: str = "document"  # document, or contiguous when there were too few documents
    documents: dict[str, int] = field(default_factory=dict)  # documents per split
    dropped: int = 0  # near-duplicate documents left out (their text is in a longer one)
    # Share of val's / test's 64-byte windows found verbatim in train: {"val_train", "test_train"}.
    overlap: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)  # {"ngram1".."ngram4": val nats/token}
    tokens: dict[str, int] = field(default_factory=dict)  # tokens per split


def split_documents(
    lengths: Sequence[int], val_fraction: float, test_fraction: float, seed: int, groups: Sequence[int] | None = None
):
    """Document indices per split, or None when the documents cannot fill three splits.

    Documents of one group (near-duplicates) move together. The groups are shuffled with
    `seed`; test then val take groups until they hold their share of the tokens, passing over
    a group that would bring them past twice their share (it stays in train); train keeps the rest. None when a
    split would be empty or train would keep less than half its share, so the caller falls back.
    """
    groups = np.arange(len(lengths)) if groups is None else np.asarray(groups)
    ids, members = np.unique(groups, return_inverse=True)
    sizes = np.bincount(members, weights=np.asarray(lengths, dtype=np.float64), minlength=len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    total = float(sum(lengths))
    where = np.full(len(ids), "train", dtype=object)
    i = 0
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        got, target = 0.0, fraction * total
        while i < len(order) and got < target:
            g = order[i]
            i += 1
            if got + sizes[g] <= 2 * target:
                where[g], got = name, got + sizes[g]
    # Within a split, documents in the order their groups were drawn (shuffled, not sorted by source).
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    by_draw = np.argsort(rank[members], kind="stable")
    picked = {s: [int(j) for j in by_draw if where[members[j]] == s] for s in SPLITS}
    train_tokens = sum(lengths[j] for j in picked["train"])
    if any(not picked[s] for s in SPLITS) or train_tokens < 0.5 * (1 - val_fraction - test_fraction) * total:
        return None
    return picked


def _join(docs: list[np.ndarray], eos_id: int | None, dtype) -> np.ndarray:
    """Documents concatenated, each followed by `eos_id` (when the tokenizer has one)."""
    if eos_id is not None:
        eos = np.array([eos_id], dtype=dtype)
        docs = [part for d in docs for part in (d, eos)]
    return np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype=dtype)


def _texts_of(tokens: np.ndarray, tok: Tokenizer) -> list[bytes]:
    """A contiguous split's text, cut at end-of-document ids, as UTF-8 bytes (for the overlap)."""
    cuts = np.flatnonzero(tokens == tok.eos_id) if tok.eos_id is not None else np.zeros(0, np.int64)
    return [tok.decode(piece.tolist()).encode("utf-8") for piece in np.split(tokens, cuts) if len(piece)]


def tokenize_and_split(cfg: DataConfig, cache_dir: Path) -> TokenSplits:
    source = get_source(cfg.source)
    tok = build_tokenizer(cfg.tokenizer)
    ds = source.load(cfg, cache_dir)
    column = source.text_column(cfg)
    texts = [t for batch in ds.iter(batch_size=1024) for t in batch[column] if t]  # empty rows are not documents
    if not texts:
        raise DataConfigError(f"data: the {cfg.source} corpus has no text in column '{column}'")
    raw = [t.encode("utf-8") for t in texts]
    every = overlap.sample_rate(sum(len(r) for r in raw))
    keep, group = overlap.near_duplicates(raw, every=every)
    kept = np.flatnonzero(keep)
    if len(kept) < len(texts):
        log.info("data: dropped %d of %d documents found in longer ones", len(texts) - len(kept), len(texts))
    docs = [tok.encode(texts[j]) for j in kept]
    lengths = [len(d) + (tok.eos_id is not None) for d in docs]
    picked = split_documents(lengths, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, group[kept])
    if picked is not None:
        arrays = {s: _join([docs[j] for j in picked[s]], tok.eos_id, tok.dtype) for s in SPLITS}
        split_texts = {s: [raw[kept[j]] for j in picked[s]] for s in SPLITS}
        split_by, counts = "document", {s: len(picked[s]) for s in SPLITS}
    else:
        # Too few documents (e.g. one book as one file): cut the stream into contiguous pieces,
        # train first, then val, then test. Still disjoint, but test text may share a document with train.
        log.warning(
            "data: %d documents cannot be split by document into train/val/test with fractions %g/%g; "
            "splitting the token stream contiguously instead (with data=text_files, data.sample_by=paragraph "
            "gives one document per paragraph)",
            len(docs),
            cfg.val_fraction,
            cfg.test_fraction,
        )
        stream = _join(docs, tok.eos_id, tok.dtype)
        n_val, n_test = int(cfg.val_fraction * len(stream)), int(cfg.test_fraction * len(stream))
        n_train = len(stream) - n_val - n_test
        arrays = {
            "train": stream[:n_train],
            "val": stream[n_train : n_train + n_val],
            "test": stream[n_train + n_val :],
        }
        split_texts = {s: _texts_of(arrays[s], tok) for s in SPLITS}
        split_by, counts = "contiguous", {}
    measured = {
        f"{s}_train": overlap.contained_fraction(split_texts[s], split_texts["train"], every=every)
        for s in ("val", "test")
    }
    floors = ngram.kneser_ney_floors(arrays["train"], arrays["val"], tok.vocab_size)
    return TokenSplits(
        **arrays,
        vocab_size=tok.vocab_size,
        tokenizer=tok.name,
        eos_id=tok.eos_id,
        split_by=split_by,
        documents=counts,
        dropped=len(texts) - len(kept),
        overlap=measured,
        floors={f"ngram{n}": v for n, v in floors.items()},
        tokens={s: int(len(arrays[s])) for s in SPLITS},
    )
