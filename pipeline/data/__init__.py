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

from pipeline.data.cache import load_token_splits
from pipeline.data.config import DataConfig, DataConfigError
from pipeline.data.datamodule import LMDataModule, fixed_windows
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
