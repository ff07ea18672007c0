"""Lightning callbacks of a run that are not about sweeps."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Training tokens per second over the steps after `warmup` (allocator and kernel warm-up),
    validation excluded.

    The clock runs over spans of steps, not step by step: on a GPU, reading the clock around
    each step would need a host sync per step (kernels run asynchronously), which stalls the
    queue. With `sync`, the device is synchronized only where a span starts or ends (the end
    of warm-up, each validation, the end of training)."""

    def __init__(self, warmup: int = 10, sync: bool = False) -> None:
        self.warmup, self.sync = warmup, sync
        self.seconds = 0.0
        self.tokens = 0
        self._t0: float | None = None  # start of the current span

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _close_span(self) -> None:
        if self._t0 is not None:
            self.seconds += self._now() - self._t0
            self._t0 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < self.warmup:
            return
        if self._t0 is None:
            self._t0 = self._now()  # the span starts after this step
        else:
            self.tokens += batch[1].numel()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_span()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_span()

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None
