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
    """Training tokens per second, over the wall time of windows of consecutive training steps.

    A window opens after `warmup` steps (allocator and kernel warm-up) and closes at each
    validation and at the end of training. The device is synchronised at those boundaries
    only: CUDA work is asynchronous, so host time per step would measure the launch queue,
    and a sync per step would slow the steps it measures. Data loading between steps counts.
    """

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.seconds = 0.0
        self.tokens = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None and trainer.global_step >= self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None:
            self.tokens += batch[1].numel()

    def _close(self, trainer, pl_module) -> None:
        if self.t0 is not None:
            self._sync(pl_module)
            self.seconds += time.perf_counter() - self.t0
            self.t0 = None

    on_validation_start = _close
    on_train_end = _close

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def mfu(self, forward_flops_per_token: float, peak: float | None) -> float | None:
        """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, app. B): achieved training
        FLOP/s (3 x the forward FLOPs per token: forward + backward) over the peak."""
        if not peak or not self.tokens_per_s:
            return None
        return self.tokens_per_s * 3 * forward_flops_per_token / peak
