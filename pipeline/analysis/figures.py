"""Figures of the study report (matplotlib, Agg). Each function takes plain data and a path.

Colours follow the configuration order of the report table, so a configuration has the same
colour in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a CI machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.analysis.powerlaw import PowerLaw  # noqa: E402

Curve = tuple[Sequence[float], Sequence[float]]


def colours(labels: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "viridis")
    n = max(len(labels), 1)
    return {lab: cmap(i if len(labels) <= 20 else i / n) for i, lab in enumerate(labels)}


def _legend(ax, n: int) -> None:
    if n <= 24:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pareto_front(points: Sequence[tuple[float, float]], x_lower_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y: lower is better)."""
    sign = 1.0 if x_lower_is_better else -1.0
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            sign * xj <= sign * xi and yj <= yi and (sign * xj < sign * xi or yj < yi)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated and math.isfinite(xi) and math.isfinite(yi):
            front.append(i)
    return sorted(front, key=lambda i: sign * points[i][0])


def curves(series: Mapping[str, Sequence[Curve]], xlabel: str, ylabel: str, path: Path) -> Path:
    """Overlaid curves, one colour per configuration, one thin line per seed."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    col = colours(list(series))
    for label, runs in series.items():
        for i, (x, y) in enumerate(runs):
            ax.plot(x, y, color=col[label], lw=1.2, alpha=0.85, label=label if i == 0 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, path)


def extrapolation(panels: Mapping[str, Mapping[str, Curve]], order: Sequence[str], path: Path) -> Path:
    """Perplexity vs length factor; one panel per positional encoding."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), sharey=True, squeeze=False)
    col = colours(list(order))
    for ax, (pos_enc, lines) in zip(axes[0], panels.items()):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o", color=col[label], label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(title=f"pos_enc = {pos_enc}", xlabel="eval length / train length")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("perplexity")
    for ax in axes[0]:
        ax.legend(fontsize=6, frameon=False)
    return _save(fig, path)


def pareto(panels: Sequence[tuple[str, bool, Mapping[str, tuple[float, float]]]], path: Path) -> Path:
    """Quality vs cost scatter with the Pareto front. Each panel: (x label, x lower is better,
    {configuration: (x, val loss)})."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (xlabel, x_low, pts) in zip(axes[0], panels):
        labels = list(pts)
        col = colours(labels)
        xy = [pts[k] for k in labels]
        for k, (x, y) in pts.items():
            ax.scatter([x], [y], color=col[k], s=30, zorder=3)
            ax.annotate(k.split(" ")[0], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(xy, x_low)
        if front:
            ax.plot(
                [xy[i][0] for i in front],
                [xy[i][1] for i in front],
                "k--",
                lw=1,
                drawstyle="steps-post",
                label="Pareto front",
            )
            ax.legend(fontsize=7, frameon=False)
        ax.set(xlabel=xlabel + (" (lower is better)" if x_low else " (higher is better)"), ylabel="final val loss")
        if all(x > 0 for x, _ in xy) and max(x for x, _ in xy) > 10 * min(x for x, _ in xy):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def effects_forest(rows: Sequence[tuple[str, float, float, float]], xlabel: str, path: Path) -> Path:
    """Main effects with confidence intervals: rows of (label, estimate, low, high)."""
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, (_label, est, lo, hi) in zip(y, rows):
        if math.isfinite(lo):
            ax.plot([lo, hi], [yi, yi], color="C0", lw=2)
        ax.plot([est], [yi], "o", color="C0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set(xlabel=xlabel)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def moe_load(loads: Mapping[str, np.ndarray], path: Path) -> Path:
    """Heatmap per MoE configuration: fraction of routing assignments, layer x expert."""
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False, layout="constrained")
    for ax, (label, m) in zip(axes[0], loads.items()):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=label, xlabel="expert", ylabel="layer")
        ax.title.set_fontsize(8)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def scaling(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]], fits: Mapping[str, PowerLaw | None], path: Path
) -> Path:
    """Final val loss vs training compute per architecture, with the fitted power laws."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    col = colours(list(points))
    for arch, (C, L) in points.items():
        ax.scatter(C, L, color=col[arch], s=20, label=arch)
        fit = fits.get(arch)
        if fit is not None:
            grid = np.logspace(np.log10(min(C)), np.log10(max(C)), 50)
            ax.plot(grid, fit.loss(grid), color=col[arch], lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="training compute C = 6 N_active D (FLOPs)", ylabel="final val loss")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(points))
    return _save(fig, path)
