"""Documents -> token arrays -> train/val/test, split by document so held-out text is unseen."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.config import SPLITS, DataConfig, DataConfigError
from pipeline.data.sources import load_documents, text_column
from pipeline.data.tokenizers import build_tokenizer

log = logging.getLogger(__name__)


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


def split_documents(lengths: Sequence[int], val_fraction: float, test_fraction: float, seed: int):
    """Document indices per split, or None when the documents cannot fill three splits.

    The documents are shuffled with `seed`; test then val take documents until they hold their
    share of the tokens; train keeps the rest. None when a split would be empty or train would
    keep less than half its share (a few very large documents), so the caller falls back.
    """
    order = np.random.default_rng(seed).permutation(len(lengths))
    total = float(sum(lengths))
    picked: dict[str, list[int]] = {}
    i = 0
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        picked[name], got = [], 0
        while i < len(order) and got < fraction * total:
            picked[name].append(int(order[i]))
            got += lengths[order[i]]
            i += 1
    picked["train"] = [int(j) for j in order[i:]]
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


def tokenize_and_split(cfg: DataConfig, cache_dir: Path) -> TokenSplits:
    tok = build_tokenizer(cfg.tokenizer)
    ds = load_documents(cfg, cache_dir)
    column = text_column(cfg)
    docs: list[np.ndarray] = []
    for batch in ds.iter(batch_size=1024):
        docs.extend(tok.encode(t) for t in batch[column] if t)  # empty rows are not documents
    if not docs:
        raise DataConfigError(f"data: the {cfg.source} corpus has no text in column '{column}'")
    lengths = [len(d) + (tok.eos_id is not None) for d in docs]
    picked = split_documents(lengths, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if picked is not None:
        arrays = {s: _join([docs[j] for j in picked[s]], tok.eos_id, tok.dtype) for s in SPLITS}
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
        split_by, counts = "contiguous", {}
    return TokenSplits(
        **arrays,
        vocab_size=tok.vocab_size,
        tokenizer=tok.name,
        eos_id=tok.eos_id,
        split_by=split_by,
        documents=counts,
    )
