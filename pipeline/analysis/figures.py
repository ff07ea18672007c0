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


def mean_band(runs: Sequence[Curve], log_x: bool = False, n: int = 60) -> tuple[np.ndarray, ...] | None:
    """(x, mean, low, high) of several runs' curves on the x range they all cover: the same x
    when the runs share them, else n points (log-spaced for a compute axis). Band: mean +- 1 sd
    over the runs (none for one run)."""
    runs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in runs if len(x)]
    if not runs:
        return None
    lo, hi = max(x.min() for x, _ in runs), min(x.max() for x, _ in runs)
    if hi < lo:
        return None
    same = all(len(x) == len(runs[0][0]) and np.allclose(x, runs[0][0]) for x, _ in runs)
    if same:
        grid = runs[0][0]
    elif log_x and lo > 0:
        grid = np.geomspace(lo, hi, n)
    else:
        grid = np.linspace(lo, hi, n)
    ys = np.array([np.interp(grid, x, y) for x, y in runs])
    mean = ys.mean(axis=0)
    sd = ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
    return grid, mean, mean - sd, mean + sd


def _floors(ax, floors: Mapping[str, float]) -> None:
    for i, (name, v) in enumerate(floors.items()):
        ax.axhline(v, color="0.35", lw=0.9, ls=(0, (4, 2 + 2 * i)), label=name)


def grouped_curves(
    panels: Mapping[str, Mapping[str, Sequence[Curve]]],
    xlabel: str,
    ylabel: str,
    path: Path,
    floors: Mapping[str, float] | None = None,
    log_x: bool = False,
    vline: float | None = None,
) -> Path:
    """One panel per factor, one line per level: the mean over that level's runs (every other
    factor and seed) with a +-1 sd band, and the n-gram floors as dashed lines."""
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    size = (9.5, 4.8) if n == 1 else (5.2 * cols, 3.9 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharey=True, layout="constrained")
    for ax, (factor, levels) in zip(axes.flat, panels.items()):
        col = colours(list(levels))
        top = []
        for level, runs in levels.items():
            mb = mean_band(runs, log_x)
            if mb is None:
                continue
            x, mean, lo, hi = mb
            ax.plot(x, mean, color=col[level], lw=1.6, label=f"{level} ({len(runs)} runs)")
            ax.fill_between(x, lo, hi, color=col[level], alpha=0.18, lw=0)
            top.append(mean[len(mean) // 4] if len(mean) > 4 else mean[0])
        if floors:
            _floors(ax, floors)
        if vline is not None and math.isfinite(vline):
            ax.axvline(vline, color="k", lw=0.8, ls=":", label="matched compute")
        if log_x:
            ax.set_xscale("log")
        ax.set(title=factor, xlabel=xlabel)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if n == 1:  # one panel of configurations: long labels go beside it
            ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7, frameon=False)
        lows = [v for v in (floors or {}).values()]
        if top:  # the early steps' large losses would squeeze the curves flat
            ax.set_ylim(top=max(top) * 1.02)
        if lows and top:
            ax.set_ylim(bottom=min(lows) * 0.98)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
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


def effects_forest(
    rows: Sequence[tuple[str, float, float, float]], xlabel: str, path: Path, significant: Sequence[bool] = ()
) -> Path:
    """Main effects with confidence intervals: rows of (label, estimate, low, high); filled
    markers for those significant after the correction, open ones for the rest."""
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    sig = list(significant) or [True] * len(rows)
    for yi, (_label, est, lo, hi), s in zip(y, rows, sig):
        if math.isfinite(lo):
            ax.plot([lo, hi], [yi, yi], color="C0", lw=2)
        ax.plot([est], [yi], "o", color="C0", mfc="C0" if s else "white")
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
            ax.plot(grid, fit.loss(grid), color=col[arch], lw=1, ls="-" if fit.identifiable else ":")
    ax.set_xscale("log")
    ax.set(xlabel="training compute C = 3 x forward FLOPs/token x tokens", ylabel="final val loss")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(points))
    return _save(fig, path)
