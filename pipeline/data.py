"""Data: text documents through `datasets`, a tokenizer, cached token splits, a LightningDataModule.

    from pipeline.data import DataConfig, LMDataModule, load_token_splits
    cfg = DataConfig.from_dict({"source": "embedded"})          # validated before any work
    splits = load_token_splits(cfg)          # .train/.val/.test 1-D numpy arrays, .cache_hit
    dm = LMDataModule(cfg, context_length=64, batch_size=32, seed=0)

The pipeline, for every source:
  1. documents: a `datasets.Dataset` with a text column (the embedded corpus, the user's text
     files, or a hub / local dataset);
  2. tokens: each document encoded on its own (bytes by default), followed by an end-of-document id;
  3. splits: documents shuffled with `split_seed`, then test and val filled up to their share of
     tokens and the rest to train, so held-out text is never seen in training;
  4. cache: the three arrays saved in one .npz keyed by corpus, split and tokenizer, written
     atomically; the next run (and every trial of a sweep) loads it and skips steps 1-3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

log = logging.getLogger(__name__)

SOURCES = ("embedded", "text_files", "hf")
SAMPLE_BY = ("document", "paragraph")  # text_files: one document per file, or per blank-line paragraph
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the cache layout or the splitting rule changes


class DataConfigError(ValueError):
    """An invalid data configuration; the message names the field, the value and what is valid."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # embedded | text_files | hf
    files: tuple[str, ...] = ()  # text_files: paths, each file one document (see sample_by)
    sample_by: str = "document"  # text_files: document | paragraph
    name: str | None = None  # hf: hub id, or a local dataset directory
    config: str | None = None  # hf: dataset configuration name
    split: str = "train"  # hf: which split of the dataset to read (we re-split it by document)
    text_field: str = "text"  # hf: column holding the text
    val_fraction: float = 0.1  # share of tokens held out for validation
    test_fraction: float = 0.1  # share of tokens held out for test (extrapolation evals)
    split_seed: int = 0  # seed of the document shuffle; kept apart from the training seed
    tokenizer: str = "byte"  # byte, or a transformers tokenizer name / local directory
    cache_dir: str | None = None  # None: .cache/tokens under the current working directory

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """A validated DataConfig; raises DataConfigError before any data is read."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise DataConfigError(f"data.{unknown[0]} is not a data setting; settings: {', '.join(known)}")
        values = {k: v for k, v in d.items()}
        files = values.get("files") or ()
        if isinstance(files, (str, os.PathLike)):
            files = (files,)
        values["files"] = tuple(str(f) for f in files)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise DataConfigError(f"data.source='{self.source}' is not a known source; valid: {', '.join(SOURCES)}")
        # Settings of one source given to another are a typo or a forgotten `data=...`: say so.
        for key, owner in (("files", "text_files"), ("name", "hf"), ("config", "hf")):
            if getattr(self, key) and self.source != owner:
                raise DataConfigError(
                    f"data.{key} is only read with data.source={owner} (source is '{self.source}'); "
                    f"select it with data={owner}"
                )
        if self.source == "text_files":
            if not self.files:
                raise DataConfigError("data.files is empty; give data.files=[path,...] with data=text_files")
            for f in self.files:
                p = Path(f).expanduser()
                if not p.exists():
                    raise DataConfigError(f"data.files: '{f}' does not exist")
                if not p.is_file():
                    raise DataConfigError(f"data.files: '{f}' is not a file")
            if self.sample_by not in SAMPLE_BY:
                raise DataConfigError(
                    f"data.sample_by='{self.sample_by}' is not valid; valid: {', '.join(SAMPLE_BY)}"
                )
        if self.source == "hf":
            if not self.name:
                raise DataConfigError("data.name is required with data=hf (a hub id or a local dataset directory)")
            if _looks_like_path(self.name) and not Path(self.name).expanduser().exists():
                raise DataConfigError(f"data.name: local dataset directory '{self.name}' does not exist")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise DataConfigError(f"data.{key}={v!r} must be a number in (0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise DataConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training text; keep the sum below 1"
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise DataConfigError(f"data.split_seed={self.split_seed!r} must be an integer")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise DataConfigError(f"data.tokenizer={self.tokenizer!r} must be 'byte' or a transformers tokenizer name")
        if self.tokenizer != "byte" and _looks_like_path(self.tokenizer):
            if not Path(self.tokenizer).expanduser().exists():
                raise DataConfigError(f"data.tokenizer: local tokenizer directory '{self.tokenizer}' does not exist")


def _looks_like_path(name: str) -> bool:
    # Hub ids look like "org/name"; local paths are written absolute, relative with ./ or ../, or with ~.
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


# --------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None  # appended after every document
    dtype: type  # smallest numpy dtype holding every id

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to download, no unknown tokens (as in ByT5).

    Documents end with the NUL byte (id 0), which real text does not contain, so the model sees
    document boundaries without a vocabulary larger than 256.
    """

    name = "byte"
    vocab_size = 256
    eos_id = 0
    dtype = np.uint8

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer by hub name or local directory (needs a network for hub names)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(name)
        self.tok.model_max_length = sys.maxsize  # documents are longer than the model's context; no warning
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=self.dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def build_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


# --------------------------------------------------------------------------- documents


def embedded_documents() -> dict[str, list[str]]:
    """The embedded corpus: the language-reference topics that ship with CPython (`pydoc_data.topics`).

    Real English technical prose, present offline on every Python install. One document per
    topic, sorted by title; exact duplicates dropped so one text cannot land in two splits.
    """
    from pydoc_data.topics import topics

    titles, texts, seen = [], [], set()
    for title in sorted(topics):
        if topics[title] not in seen:
            seen.add(topics[title])
            titles.append(title)
            texts.append(topics[title])
    return {"title": titles, "text": texts}


def load_documents(cfg: DataConfig, cache_dir: Path):
    """The corpus as a `datasets.Dataset`, one row per document, text in column `text_column(cfg)`."""
    import datasets

    if cfg.source == "embedded":
        return datasets.Dataset.from_dict(embedded_documents())
    if cfg.source == "text_files":
        files = [str(Path(f).expanduser().resolve()) for f in cfg.files]
        return datasets.load_dataset(
            "text", data_files=files, sample_by=cfg.sample_by, split="train", cache_dir=str(cache_dir / "datasets")
        )
    # hf: a directory written by `save_to_disk`, a directory of data files, or a hub id.
    local = Path(cfg.name).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataConfigError(f"data.split='{cfg.split}' is not in '{cfg.name}'; splits: {', '.join(ds)}")
                ds = ds[cfg.split]
        elif local.exists():
            ds = datasets.load_dataset(str(local), cfg.config, split=cfg.split, cache_dir=str(cache_dir / "datasets"))
        else:
            ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split)
    except DataConfigError:
        raise
    except Exception as e:  # not found, offline, bad config or split: one line naming what failed
        raise DataConfigError(
            f"data.name='{cfg.name}' (config={cfg.config}, split={cfg.split}) could not be loaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if cfg.text_field not in ds.column_names:
        raise DataConfigError(
            f"data.text_field='{cfg.text_field}' is not a column of '{cfg.name}'; columns: {', '.join(ds.column_names)}"
        )
    return ds


def text_column(cfg: DataConfig) -> str:
    return cfg.text_field if cfg.source == "hf" else "text"


# --------------------------------------------------------------------------- splits


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

    def summary(self) -> dict[str, Any]:
        """Numbers worth logging with a run."""
        return {
            **{f"{s}_tokens": int(len(getattr(self, s))) for s in SPLITS},
            **{f"{s}_documents": self.documents.get(s, 0) for s in SPLITS},
            "vocab_size": self.vocab_size,
            "split_by": self.split_by,
            "cache_hit": self.cache_hit,
        }


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


def _tokenize_and_split(cfg: DataConfig, cache_dir: Path) -> TokenSplits:
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
            "gives one document per paragraph)", len(docs), cfg.val_fraction, cfg.test_fraction,
        )
        stream = _join(docs, tok.eos_id, tok.dtype)
        n_val, n_test = int(cfg.val_fraction * len(stream)), int(cfg.test_fraction * len(stream))
        n_train = len(stream) - n_val - n_test
        arrays = {"train": stream[:n_train], "val": stream[n_train : n_train + n_val], "test": stream[n_train + n_val :]}
        split_by, counts = "contiguous", {}
    return TokenSplits(
        **arrays, vocab_size=tok.vocab_size, tokenizer=tok.name, eos_id=tok.eos_id,
        split_by=split_by, documents=counts,
    )


# --------------------------------------------------------------------------- cache


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """What makes the corpus what it is, computed without reading it (except the small embedded one)."""
    if cfg.source == "embedded":
        docs = embedded_documents()["text"]
        return {"source": "embedded", "sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest()}
    if cfg.source == "text_files":
        return {"source": "text_files", "files": [_stat(Path(f).expanduser()) for f in cfg.files],
                "sample_by": cfg.sample_by}
    ident: dict[str, Any] = {"source": "hf", "name": cfg.name, "config": cfg.config, "split": cfg.split,
                             "text_field": cfg.text_field}
    local = Path(cfg.name).expanduser()
    if local.exists():  # a local directory: its files, so edits invalidate the cache
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        ident["files"] = [_stat(p) for p in files]
    return ident


def cache_key(cfg: DataConfig) -> str:
    ident = {
        "format": CACHE_FORMAT,
        "corpus": corpus_identity(cfg),
        "split": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed},
        "tokenizer": cfg.tokenizer,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.source}-{Path(cfg.tokenizer).name}-{digest}"


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.cwd() / ".cache" / "tokens"


def _save(path: Path, splits: TokenSplits) -> None:
    """Write the splits to `path` atomically: a temp file in the same folder, then rename, so a
    concurrent reader sees either no file or the whole file."""
    meta = {k: getattr(splits, k) for k in ("vocab_size", "tokenizer", "eos_id", "split_by", "documents")}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train=splits.train, val=splits.val, test=splits.test, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> TokenSplits:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return TokenSplits(train=z["train"], val=z["val"], test=z["test"], cache_hit=True, cache_path=path, **meta)


def load_token_splits(cfg: DataConfig, cache_dir: Path | None = None) -> TokenSplits:
    """Train/val/test token arrays: from the on-disk cache when present, else built and cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    path = root / f"{cache_key(cfg)}.npz"
    if path.exists():
        try:
            splits = _load(path)
            log.info("data: token cache hit %s", path)
            return splits
        except Exception as e:  # an unreadable file (older format, disk trouble): rebuild it
            log.warning("data: token cache %s unreadable (%s); rebuilding", path, e)
    root.mkdir(parents=True, exist_ok=True)
    splits = _tokenize_and_split(cfg, root)
    _save(path, splits)
    splits.cache_path = path
    log.info("data: tokenized %s into %s", {s: len(getattr(splits, s)) for s in SPLITS}, path)
    return splits


# --------------------------------------------------------------------------- batches


class RandomWindows(IterableDataset):
    """An endless stream of (x, y) batches of random windows; y is x shifted by one token.

    Positions come from a torch.Generator seeded with `seed`, so a rerun draws the same batches.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        self.tokens, self.T, self.B, self.seed = tokens, context_length, batch_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()  # with workers, each draws its own stream
        g = torch.Generator().manual_seed(self.seed + (worker.id * 100_003 if worker else 0))
        offsets = np.arange(self.T + 1)
        while True:
            starts = torch.randint(0, len(self.tokens) - self.T, (self.B,), generator=g).numpy()
            chunk = torch.from_numpy(self.tokens[starts[:, None] + offsets].astype(np.int64))  # (B, T+1)
            yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def fixed_windows(tokens: np.ndarray, context_length: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n non-overlapping windows spread evenly over `tokens`: x (n, T) and y (n, T)."""
    T = context_length
    available = (len(tokens) - 1) // T
    n = min(n, available)
    starts = np.linspace(0, available - 1, n).round().astype(np.int64) * T  # distinct: step >= 1
    chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class LMDataModule(L.LightningDataModule):
    """Batches of token windows for next-token prediction over one DataConfig."""

    def __init__(self, cfg: DataConfig, context_length: int, batch_size: int, seed: int = 0,
                 val_batches: int = 8, num_workers: int = 0):
        super().__init__()
        self.cfg, self.context_length, self.batch_size = cfg, context_length, batch_size
        self.seed, self.val_batches, self.num_workers = seed, val_batches, num_workers
        self._splits: TokenSplits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        splits = load_token_splits(self.cfg)
        for s in ("train", "val"):
            if len(getattr(splits, s)) <= self.context_length:
                raise DataConfigError(
                    f"data: the {s} split has {len(getattr(splits, s))} tokens, fewer than one window of "
                    f"context_length={self.context_length} + 1; use more text or other data.*_fraction values"
                )
        self._splits = splits

    @property
    def splits(self) -> TokenSplits:
        self.setup()  # loads on first use, so vocab_size is known before the model is built
        return self._splits

    @property
    def vocab_size(self) -> int:
        return self.splits.vocab_size

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.splits.train, self.context_length, self.batch_size, self.seed)
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        x, y = fixed_windows(self.splits.val, self.context_length, self.val_batches * self.batch_size)
        if len(x) > self.batch_size:  # full batches only, so every batch weighs the same in the mean
            x, y = x[: len(x) - len(x) % self.batch_size], y[: len(y) - len(y) % self.batch_size]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=False)

    def test_tokens(self) -> torch.Tensor:
        """The held-out test split as one LongTensor, for evaluation at any context length."""
        return torch.from_numpy(self.splits.test.astype(np.int64))
