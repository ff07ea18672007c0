"""Per-run plots, drawn from what MLflow recorded (so they show exactly the logged numbers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from pipeline.tracking.schema import Metric  # noqa: E402


def plot_loss_curves(uri: str, run_id: str, path: Path) -> Path:
    """train/loss and val/loss against optimizer step."""
    client = MlflowClient(uri)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in (Metric.TRAIN_LOSS, Metric.VAL_LOSS):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot(
                [m.step for m in history],
                [m.value for m in history],
                marker="." if key == Metric.VAL_LOSS else None,
                label=key,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"run {run_id[:8]}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
