"""The token cache: one .npz per corpus, split and tokenizer, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.config import SPLITS, DataConfig
from pipeline.data.sources import get_source
from pipeline.data.splits import META, TokenSplits, tokenize_and_split

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # bump when the cache layout or the splitting rule changes (2: near-duplicates, floors)


def cache_key(cfg: DataConfig) -> str:
    ident = {
        "format": CACHE_FORMAT,
        "corpus": get_source(cfg.source).identity(cfg),
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
    meta = {k: getattr(splits, k) for k in META}
    meta["sha256"] = {s: _digest(getattr(splits, s)) for s in SPLITS}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train=splits.train, val=splits.val, test=splits.test, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class CorruptCache(ValueError):
    """A cache file whose arrays do not match the checksums written with them."""


def _load(path: Path) -> TokenSplits:
    with np.load(path, allow_pickle=False) as z:  # a cache file is data, never code
        meta = json.loads(str(z["meta"]))
        arrays = {s: z[s] for s in SPLITS}
    expected = meta.pop("sha256", None)
    if expected is None:
        raise CorruptCache("no checksums (written by an older version)")
    for name, a in arrays.items():
        if _digest(a) != expected.get(name):
            raise CorruptCache(f"the {name} split does not match its checksum")
    return TokenSplits(**arrays, cache_hit=True, cache_path=path, **meta)


def cached_meta(cfg: DataConfig, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The cached corpus's metadata (split sizes, overlap, floors) without reading its tokens;
    None when it is not cached yet. Cheap enough for config validation."""
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)) / f"{cache_key(cfg)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:  # an .npz is a zip: only the `meta` member is read
            return json.loads(str(z["meta"]))
    except Exception:  # absent, or unreadable (it is rebuilt on load)
        return None


def load_token_splits(cfg: DataConfig, cache_dir: Path | None = None) -> TokenSplits:
    """Train/val/test token arrays: from the on-disk cache when present, else built and cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    path = root / f"{cache_key(cfg)}.npz"
    if path.exists():
        try:
            splits = _load(path)
            log.info("data: token cache hit %s", path)
            return splits
        except Exception as e:  # truncated, garbled, older format, disk trouble: never train on it
            log.warning("data: token cache %s is unusable (%s); rebuilding it", path, e)
    root.mkdir(parents=True, exist_ok=True)
    splits = tokenize_and_split(cfg, root)
    _save(path, splits)
    splits.cache_path = path
    log.info("data: tokenized %s into %s", {s: len(getattr(splits, s)) for s in SPLITS}, path)
    return splits
