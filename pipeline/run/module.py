"""LightningModule around DecoderLM: loss, AdamW with decay groups, warmup + cosine schedule.

It knows nothing of sweeps or MLflow; metrics go through `self.log` to whatever logger the
Trainer has. A training step never reads a value back to the host (a CUDA sync, which at the GPU
budget's 1-3 ms steps costs as much as the step): metrics are logged only at logging steps (every
`trainer.log_every_n_steps`), and the loss checked for NaN/inf every `check_finite_every` steps
(on a GPU the runner makes that the logging interval).

Under DDP (trainer=ddp, pipeline/run/ddp.py) every rank trains on its slice of the global batch;
the logged losses are all-reduced means over the ranks, so the curves are those of one process
at the same global batch; `train/tokens_seen` counts the tokens of all ranks.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.model import DecoderLM, ModelConfig
from pipeline.run.optim import OptimConfig, lr_lambda
from pipeline.tracking.schema import Metric, moe_load


class LitDecoderLM(L.LightningModule):
    """`check_finite_every`: steps between checks that the training loss stayed finite. Each
    check reads a value back to the host, which on a GPU waits for all queued work; so a GPU
    run checks every few steps (a flag kept on the device records every step in between)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        max_steps: int,
        check_finite_every: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = DecoderLM(model_cfg)
        # torch.compile (trainer.compile): the forward pass has no host syncs or graph breaks
        # (tested with fullgraph=True), so Inductor fuses norms, activations and rotary ops.
        # Kept out of the module tree (no duplicate state_dict keys); evaluation and decoding
        # stay eager, since their shapes change from call to call.
        self.__dict__["step_model"] = torch.compile(self.model, fullgraph=True) if compile else self.model
        self.optim = optim
        self.max_steps = max_steps
        self.check_finite_every = check_finite_every
        self._finite: Tensor | None = None  # all training losses finite since the last check
        self._last_loss: Tensor | None = None
        self._load_sum: Tensor | None = None  # MoE expert load summed since the last validation
        self._load_steps = 0
        self.tokens_seen = 0

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def _log_step(self) -> bool:
        """Lightning's rule for the steps whose metrics reach the logger (and the last step)."""
        step = self.global_step + 1
        return step % max(1, self.trainer.log_every_n_steps) == 0 or step >= self.max_steps

    @property
    def _sync(self) -> bool:
        """All-reduce logged values over the ranks (a no-op, and skipped, on one device)."""
        return self.trainer.world_size > 1

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits, aux = self.step_model(x, return_aux=True)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self._track_finite(lm_loss)
        self.tokens_seen += y.numel() * self.trainer.world_size  # every rank's slice of the global batch
        log_now = self._log_step()
        if log_now:
            # Only at logging steps, and not on the progress bar: it reads its metrics back at
            # every step, not only these. Under DDP the mean over the ranks' equal slices is the
            # loss of the global batch (every rank logs at the same steps, so the all-reduce pairs up).
            self.log(Metric.TRAIN_LOSS, lm_loss, sync_dist=self._sync)
            self.log(Metric.TRAIN_TOKENS_SEEN, float(self.tokens_seen))
            self.log(Metric.LR, self.optimizers().param_groups[0]["lr"])
        if not aux:
            return lm_loss
        # MoE: load-balancing and z-losses join the objective (Switch; ST-MoE).
        if log_now:
            self.log_dict(
                {
                    Metric.MOE_BALANCE: aux["moe_balance"],
                    Metric.MOE_Z: aux["moe_z"],
                    Metric.MOE_DROPPED: aux["moe_dropped"].float(),
                },
                sync_dist=self._sync,
            )
        load = aux["expert_load"]
        self._load_sum = load if self._load_sum is None else self._load_sum + load
        self._load_steps += 1
        return lm_loss + aux["moe_loss"]

    def _track_finite(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self._last_loss = loss.detach()
        if (self.global_step + 1) % self.check_finite_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise if a training loss since the last check was NaN or infinite."""
        finite, self._finite = self._finite, None
        if finite is None or bool(finite):
            return
        if self.check_finite_every == 1:
            raise FloatingPointError(f"{Metric.TRAIN_LOSS} is {self._last_loss.item()} at step {self.global_step}")
        every = self.check_finite_every
        raise FloatingPointError(
            f"{Metric.TRAIN_LOSS} was not finite at a step up to {self.global_step} (checked every {every})"
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
        # Averaged over the val batches, then over the ranks (each holds an equal share of the windows).
        self.log(Metric.VAL_LOSS, loss, prog_bar=True, sync_dist=self._sync)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get(Metric.VAL_LOSS)
        if val_loss is not None:
            self.log(Metric.VAL_PPL, torch.exp(val_loss), sync_dist=self._sync)  # equal on every rank
        if self._load_sum is not None and self._load_steps:
            load = self._load_sum / self._load_steps
            if self._sync:  # the experts' load over every rank's tokens, in one all-reduce
                load = self.trainer.strategy.reduce(load, reduce_op="mean")
            load = load.tolist()
            self.log_dict({moe_load(i, j): v for i, row in enumerate(load) for j, v in enumerate(row)})
            self._load_sum, self._load_steps = None, 0

    def configure_optimizers(self):
        # Weight decay on matrices only; biases, norm gains and embedding tables excluded.
        decay, no_decay = [], []
        embeddings = {id(p) for m in self.model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        for p in self.model.parameters():
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
        o = self.optim
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            # One multi-tensor kernel per step on CUDA instead of a loop over parameters.
            fused=self.device.type == "cuda" or None,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
