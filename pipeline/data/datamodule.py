"""Batches for training and validation: random windows of the train split, fixed windows of val."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pipeline.data.cache import load_token_splits
from pipeline.data.config import DataConfig, DataConfigError
from pipeline.data.splits import TokenSplits


class RandomWindows(IterableDataset):
    """An endless stream of (x, y) batches of random windows; y is x shifted by one token.

    Positions come from a torch.Generator seeded with `seed`, so a rerun draws the same batches.
    With `world_size` > 1 (DDP), every rank draws the same global batch of `batch_size` windows
    and keeps its own contiguous slice of `batch_size // world_size` rows: the ranks together see
    exactly the batches of one process, in the same order.
    """

    def __init__(
        self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.tokens, self.T, self.B, self.seed = tokens, context_length, batch_size, seed
        self.rows = shard_rows(batch_size, rank, world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()  # with workers, each draws its own stream
        g = torch.Generator().manual_seed(self.seed + (worker.id * 100_003 if worker else 0))
        offsets = np.arange(self.T + 1)
        while True:
            starts = torch.randint(0, len(self.tokens) - self.T, (self.B,), generator=g).numpy()
            starts = starts[self.rows]  # this rank's rows of the global batch (all of them on one device)
            chunk = torch.from_numpy(self.tokens[starts[:, None] + offsets].astype(np.int64))  # (B / world, T+1)
            yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def shard_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s rows of a global batch of `batch_size`, split evenly over `world_size` ranks."""
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(f"a batch of {batch_size} cannot be split evenly over {world_size} ranks (rank {rank})")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


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

    def __init__(
        self,
        cfg: DataConfig,
        context_length: int,
        batch_size: int,
        seed: int = 0,
        val_batches: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        """`batch_size` is the global batch; with `world_size` > 1 (DDP) this rank loads its
        share, `batch_size // world_size` rows of every global batch (train and val)."""
        super().__init__()
        shard_rows(batch_size, rank, world_size)  # refuse an uneven split now, not in a loader
        self.cfg, self.context_length, self.batch_size = cfg, context_length, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.val_batches, self.num_workers = seed, val_batches, num_workers
        self.pin_memory = pin_memory  # for a CUDA run: batches in page-locked memory
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
        windows = RandomWindows(
            self.splits.train, self.context_length, self.batch_size, self.seed, self.rank, self.world_size
        )
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        B, world = self.batch_size, self.world_size
        x, y = fixed_windows(self.splits.val, self.context_length, self.val_batches * B)
        if len(x) > B:  # full batches only, so every batch weighs the same in the mean
            x, y = x[: len(x) - len(x) % B], y[: len(y) - len(y) % B]
        if world > 1:
            if len(x) < B:  # one short batch: as many rows as split evenly over the ranks
                B = len(x) - len(x) % world
                if B == 0:
                    raise DataConfigError(
                        f"data: the val split holds {len(x)} windows of context_length={self.context_length}, "
                        f"fewer than trainer.devices={world}; use more text or fewer devices"
                    )
            # Each rank takes its slice of every global batch: the mean of the ranks' val losses
            # (all-reduced) is then the one-process mean over the same windows.
            rows = torch.arange(len(x) - len(x) % B).view(-1, B)[:, shard_rows(B, self.rank, world)].flatten()
            x, y = x[rows], y[rows]
        loader_batch = B // world
        return DataLoader(TensorDataset(x, y), batch_size=loader_batch, shuffle=False, pin_memory=self.pin_memory)

    def test_tokens(self) -> torch.Tensor:
        """The held-out test split as one LongTensor, for evaluation at any context length."""
        return torch.from_numpy(self.splits.test.astype(np.int64))
