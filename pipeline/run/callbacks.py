"""Lightning callbacks of a run that are not about sweeps."""

from __future__ import annotations

import time

import lightning as L
import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity), matched
# against torch.cuda.get_device_name. H100 and H200 SXM share the same compute die.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device, precision: str, stated: float | None = None) -> float | None:
    """The peak MFU is taken against: `stated` (trainer.peak_flops) if given, else the table's
    bf16 peak for a known GPU under bf16/fp16 precision, else None (no MFU is logged)."""
    if stated is not None:
        return float(stated)
    if device.type != "cuda" or not str(precision).startswith(("bf16", "16")):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Throughput(L.Callback):
    """Training tokens per second over the steps after `warmup` (allocator and kernel warm-up),
    validation excluded. Under DDP it runs on rank 0 and counts the tokens of every rank (the
    ranks step in lockstep), so it is the trial's throughput, not one device's.

    The clock runs over spans of steps, not step by step: on a GPU, reading the clock around
    each step would need a host sync per step (kernels run asynchronously), which stalls the
    queue. With `sync`, the device is synchronized only where a span starts or ends (the end
    of warm-up, each validation, the end of training)."""

    def __init__(self, warmup: int = 10, sync: bool = False) -> None:
        self.warmup, self.sync = warmup, sync
        self.seconds = 0.0
        self.tokens = 0
        self.world_size = 1  # ranks training together (DDP), each on an equal slice of the batch
        self._t0: float | None = None  # start of the current span

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _close_span(self) -> None:
        if self._t0 is not None:
            self.seconds += self._now() - self._t0
            self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.world_size = trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < self.warmup:
            return
        if self._t0 is None:
            self._t0 = self._now()  # the span starts after this step
        else:
            self.tokens += batch[1].numel() * self.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_span()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_span()

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    def mfu(self, forward_flops_per_token: float, peak: float | None) -> float | None:
        """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): achieved training
        FLOP/s (3 x the forward FLOPs per token: forward + backward) over the peak."""
        if not peak or not self.tokens_per_s:
            return None
        return self.tokens_per_s * 3 * forward_flops_per_token / peak
