"""Lightning callbacks of a run that are not about sweeps."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Training tokens per second: time inside training steps (forward, backward, optimizer),
    after `warmup` steps (allocator and kernel warm-up), validation excluded."""

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup
        self.t0 = 0.0
        self.seconds = 0.0
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - self.t0
            self.tokens += batch[1].numel()

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None
