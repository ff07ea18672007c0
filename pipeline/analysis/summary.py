"""A study in two lines, from what the report computes: its best configuration and the factors
whose main effect on final val loss is significant. The report's parent run shows them as its
description in the MLflow UI, under a link to the HTML report."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.analysis.document import fmt_ci, fmt_stat
from pipeline.analysis.effects import MainEffect
from pipeline.analysis.study import Configuration, factorial, factors_and_levels
from pipeline.tracking.schema import Metric


def best_line(configs: Sequence[Configuration]) -> str:
    """The configuration with the lowest mean final val loss (the report's first row)."""
    done = [c for c in configs if math.isfinite(c.stat(Metric.VAL_LOSS)[0])]
    if not done:
        return "Best configuration: none (no finished trial logged val/loss)."
    best = done[0]
    mean, std, n = best.stat(Metric.VAL_LOSS)
    levels = ", ".join(f"{k}={v}" for k, v in best.levels.items())
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    return f"Best configuration: {best.id} {levels}; val loss {fmt_stat(mean, std)} over {seeds}."


def significant_effects(
    configs: Sequence[Configuration], extra: Sequence[str], reference: dict[str, str]
) -> tuple[list[MainEffect], int]:
    """Main effects on final val loss whose 95% interval excludes zero (the report's factor
    effects table), best first; and how many main effects were estimated."""
    factors, levels, ref = factors_and_levels(configs, extra, reference)
    if not factors:
        return [], 0
    mains = factorial(configs, factors, levels, ref, Metric.VAL_LOSS).main_effects()
    return sorted((e for e in mains if e.excludes_zero), key=lambda e: e.estimate), len(mains)


def effects_line(effects: Sequence[MainEffect], n_estimated: int) -> str:
    if n_estimated == 0:
        return "Significant factors: none to test (no factor has two or more levels)."
    if not effects:
        return f"Significant factors: none (all {n_estimated} main effects on val loss have a 95% interval across 0)."
    items = "; ".join(f"{e.factor} {e.level} vs {e.reference} {fmt_ci(e)}" for e in effects)
    return f"Significant factors (Δ final val loss vs reference, 95% interval excludes 0): {items}."


def summary(configs: Sequence[Configuration], extra: Sequence[str], reference: dict[str, str]) -> tuple[str, str]:
    return best_line(configs), effects_line(*significant_effects(configs, extra, reference))


def description(summary_lines: Sequence[str], report_link: str, report_path: str) -> str:
    """Markdown for the run that holds the report: a link to the HTML report, then the summary."""
    return "\n\n".join([f"**[Study report]({report_link})** (`{report_path}`)", *summary_lines])
