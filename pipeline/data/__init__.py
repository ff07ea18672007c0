"""Data: text documents through `datasets`, a tokenizer, cached token splits, a LightningDataModule.

    from pipeline.data import DataConfig, LMDataModule, load_token_splits
    cfg = DataConfig.from_dict({"source": "embedded"})          # validated before any work
    splits = load_token_splits(cfg)          # .train/.val/.test 1-D numpy arrays, .cache_hit
    dm = LMDataModule(cfg, context_length=64, batch_size=32, seed=0)

The pipeline, for every source (a registry: pipeline.data.sources):
  1. documents: a `datasets.Dataset` with a text column (the embedded corpus, the user's text
     files, or a hub / local dataset);
  2. near-duplicates: documents mostly contained in longer ones are dropped, and documents that
     share 64-byte windows are grouped (pipeline.data.overlap);
  3. tokens: each document encoded on its own (bytes by default), followed by an end-of-document id;
  4. splits: groups shuffled with `split_seed`, then test and val filled up to their share of
     tokens and the rest to train, so held-out text is not seen in training; the remaining
     verbatim overlap and the n-gram floors (pipeline.data.ngram) are measured;
  5. cache: the arrays and those numbers saved in one .npz keyed by corpus, split and tokenizer,
     written atomically; the next run (and every trial of a sweep) loads it and skips steps 1-4.
"""

from pipeline.data.cache import load_token_splits
from pipeline.data.config import DataConfig, DataConfigError
from pipeline.data.splits import TokenSplits
from pipeline.data.tokenizers import build_tokenizer

__all__ = [
    "DataConfig",
    "DataConfigError",
    "LMDataModule",
    "TokenSplits",
    "build_tokenizer",
    "fixed_windows",
    "load_token_splits",
]

# The datamodule imports Lightning (seconds). Loaded on first use, so that the config checks,
# the token cache and every import of `pipeline.errors` (the sweeper's storage, each worker)
# do not pay for it.
_LAZY = {"LMDataModule", "fixed_windows"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from pipeline.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
