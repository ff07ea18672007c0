"""The sections of the study report, each `section_x(doc, ...)` writing into a Doc and
returning the figures it drew; pipeline.analysis.report puts them in order.

Order of the report: a summary first (what stands out after the multiplicity correction, at
equal steps and at equal compute; whether the training budget was adequate), then the evidence.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis import figures as plots
from pipeline.analysis.anova import variance_shares
from pipeline.analysis.compute import loss_at_compute, loss_vs_compute, tokens_at, training_flops
from pipeline.analysis.document import Doc, fmt, fmt_ci, fmt_stat
from pipeline.analysis.effects import ASSUMPTIONS, Estimate, Factorial, Interaction, MainEffect
from pipeline.analysis.powerlaw import fit_power_law, multiplier_with_interval
from pipeline.analysis.study import (
    BASELINE,
    FAMILIES,
    Configuration,
    Selection,
    Trial,
    level_of,
)
from pipeline.tracking.uri import redact

COST_COLUMNS = {  # metric -> column header, in the tables' order
    "cost/params_total": "params total",
    "cost/params_active": "params active",
    "cost/kv_bytes_per_token": "KV B/token",
    "cost/decode_tokens_per_s": "decode tok/s",
    "cost/train_tokens_per_s": "train tok/s",
}
MOE_LOAD = re.compile(r"^moe/load/l(\d+)/e(\d+)$")
EXTRAP = re.compile(r"^extrap/ppl_x([0-9.]+)$")
FLOOR = re.compile(r"^floor/ngram(\d+)$")
BIGRAM_FLOOR = "floor/ngram2"
ALPHA = 0.05  # family-wise level of the Holm correction
# Budget adequacy: a run "still falls fast" when its val loss dropped by more than this share
# of its final value over the last quarter of its steps: more steps would move the numbers.
STILL_FALLING_SHARE = 0.25
STILL_FALLING_DROP = 0.01
SIZE_KEYS = ("model.d_model", "model.n_layers")


# ---------------------------------------------------------------------------------------------
# What the sections share


def extrap_factors(configs: Sequence[Configuration]) -> list[tuple[float, str]]:
    keys = {k for c in configs for t in c.trials for k in t.metrics if EXTRAP.match(k)}
    return sorted((float(EXTRAP.match(k).group(1)), k) for k in keys)


def bits_per_nat_token(trials: Sequence[Trial]) -> float | None:
    """Bits per byte per nat per token: 1/ln 2 x tokens per byte. Known for the byte
    tokenizer (one token per byte); None for a subword tokenizer (its bytes per token are not
    logged), and the report says so."""
    toks = {t.params.get("data.tokenizer") for t in trials}
    return 1.0 / math.log(2) if toks == {"byte"} else None


def floors(trials: Sequence[Trial]) -> dict[str, float]:
    """floor/ngram<n> (mean over the runs that logged it; one data split gives one value)."""
    vals: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for k, v in t.metrics.items():
            m = FLOOR.match(k)
            if m:
                vals[int(m.group(1))].append(v)
    return {f"floor/ngram{n}": float(np.mean(vals[n])) for n in sorted(vals)}


def still_falling(t: Trial) -> float | None:
    """Val-loss drop over the last quarter of the run's steps, as a share of its final value."""
    if "val/loss" not in t.curves:
        return None
    steps, loss = t.curves["val/loss"]
    if len(steps) < 2:
        return None
    at = steps[-1] - STILL_FALLING_SHARE * (steps[-1] - steps[0])
    return float((np.interp(at, steps, loss) - loss[-1]) / loss[-1])


@dataclass
class Effects:
    """One reading of the factor effects: at equal steps (final val loss) or matched compute."""

    what: str  # "final val loss" | "val loss at 1.2e12 FLOPs"
    fac: Factorial
    mains: list[MainEffect]
    inters: list[Interaction]

    @property
    def family(self) -> int:
        return sum(math.isfinite(e.p) for e in [*self.mains, *self.inters])

    def significant(self) -> list[Estimate]:
        return [e for e in [*self.mains, *self.inters] if e.significant(ALPHA)]

    def methods(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in [*self.mains, *self.inters]:
            out[e.method] += 1
        return dict(out)


def read_effects(what: str, fac: Factorial) -> Effects:
    mains, inters = fac.analyse()
    return Effects(what, fac, mains, inters)


def describe(e: Estimate) -> str:
    if isinstance(e, MainEffect):
        return f"{e.factor} = `{e.level}` vs `{e.reference}`"
    return f"({e.factor_a}: `{e.level_a}` vs `{e.reference_a}`) × ({e.factor_b}: `{e.level_b}` vs `{e.reference_b}`)"


def method_sentence(eff: Effects) -> str:
    methods = eff.methods()
    parts = [f"{n} by {m}: {ASSUMPTIONS[m]}" for m, n in sorted(methods.items(), key=lambda x: -x[1])]
    return (
        f"Intervals ({eff.family} contrasts with a p-value): "
        + "; ".join(parts)
        + f". Holm's correction across all {eff.family} main effects and interactions "
        f"(family-wise level {ALPHA:g}): a contrast *stands out* when its Holm-adjusted p ≤ {ALPHA:g}."
    )


# ---------------------------------------------------------------------------------------------
# Summary


def section_summary(
    doc: Doc, sel: Selection, configs, at_steps: Effects | None, at_compute: Effects | None, c_star: float, bpt
) -> None:
    doc.h(2, "Summary")
    seeds = sorted({t.seed for t in sel.used}, key=lambda s: s.zfill(12))
    data = [
        f"**Data**: {len(sel.used)} runs in {len(configs)} configurations, seeds {', '.join(seeds) or '—'}; "
        "one run per (configuration, seed), the newest"
        + (f" ({len(sel.superseded)} older duplicates left out)" if sel.superseded else "")
        + (
            f"; {len(sel.reruns)} reruns (`rerun_of`) are checks, not replicates, and are left out"
            if sel.reruns
            else ""
        )
        + "."
    ]
    if len(sel.commits) > 1:
        data.append(
            f"**Warning: the runs come from {len(sel.commits)} code versions** (`git_commit`: "
            + ", ".join(f"`{c[:12]}` {n} runs" for c, n in sel.commits.most_common())
            + "); differences between configurations may be differences between versions."
        )
    doc.ul(data)
    for eff, label in ((at_steps, "equal steps"), (at_compute, "equal compute")):
        if eff is None:
            continue
        sig = eff.significant()
        head = f"**At {label}** ({eff.what}; {eff.family} contrasts, Holm at {ALPHA:g}): "
        if not sig:
            biggest = sorted(eff.mains, key=lambda e: -abs(e.estimate) if math.isfinite(e.estimate) else 0)[:3]
            doc.p(
                head
                + "nothing stands out after the correction. Largest estimated main effects: "
                + "; ".join(f"{describe(e)} {fmt_ci(e)}" for e in biggest if math.isfinite(e.estimate))
                + "."
            )
        else:
            doc.p(head + f"{len(sig)} stand out:")
            doc.ul([f"{describe(e)}: {fmt_ci(e)}{bpb_text(e.estimate, bpt)}, Holm p = {e.p_holm:.3g}" for e in sig])
    if at_compute is None:
        doc.p(f"**At equal compute**: {compute_missing(c_star)}")


def bpb_text(delta: float, bpt: float | None) -> str:
    return f" nats/token ({delta * bpt:+.4f} bits/byte)" if bpt and math.isfinite(delta) else ""


def compute_missing(c_star: float) -> str:
    if math.isnan(c_star):
        return "not available: the runs did not log `cost/flops_per_token` with a `val/loss` curve."
    return "not available: too few runs reach the matched compute."


def section_budget(doc: Doc, configs, fl: dict[str, float]) -> None:
    items = []
    if BIGRAM_FLOOR in fl:
        worse = [c for c in configs if c.stat("val/loss")[0] >= fl[BIGRAM_FLOOR]]
        items.append(
            f"Bigram floor (`{BIGRAM_FLOOR}` = {fl[BIGRAM_FLOOR]:.4f}, a smoothed 2-gram model of the train split): "
            + (
                "every configuration beats it."
                if not worse
                else f"{len(worse)} configurations do not beat it: "
                + ", ".join(c.id for c in worse)
                + " (they learned less than bigram statistics; their effects say little about the architecture)."
            )
        )
    else:
        items.append(
            "N-gram floors (`floor/ngram1`..`floor/ngram4`) were not logged in this study: the bigram check is skipped."
        )
    falling = []
    for c in configs:
        drops = [d for t in c.trials if (d := still_falling(t)) is not None]
        if drops and np.mean(drops) > STILL_FALLING_DROP:
            falling.append(f"{c.id} ({np.mean(drops):.1%})")
    items.append(
        f"Still falling fast (val loss dropped by more than {STILL_FALLING_DROP:.0%} of its final value over "
        f"the last {STILL_FALLING_SHARE:.0%} of the steps, seed mean): "
        + (
            f"{len(falling)} of {len(configs)} configurations: " + ", ".join(falling) + ". "
            "The budget did not train these to convergence; rankings may change with more steps."
            if falling
            else "none: the curves had flattened."
        )
    )
    doc.p("**Budget adequacy**:")
    doc.ul(items)


# ---------------------------------------------------------------------------------------------
# Configurations and curves


def section_table(doc: Doc, configs, extra, factors_x, bpt, c_star: float) -> None:
    doc.h(2, "Configurations")
    doc.p(
        "One row per configuration, best final val loss first. Values: mean ± sample std "
        "(ddof = 1) over the n distinct seeds; losses in nats/token"
        + (", bits/byte beside them (byte tokenizer: 1 token = 1 byte)" if bpt else "")
        + "; the run ids (first 8 characters) are the MLflow runs averaged; the per-run values are in the last section."
    )
    header = ["id", *FAMILIES, *extra, "n", "val loss"]
    if bpt:
        header.append("bits/byte")
    if math.isfinite(c_star):
        header.append("val loss @ matched compute")
    header += [
        "val ppl",
        *[f"ppl ×{f:g}" for f, _ in factors_x],
        "train FLOPs",
        *COST_COLUMNS.values(),
        "wall s",
        "runs",
    ]
    rows = []
    for c in configs:
        mean, std, n = c.stat("val/loss")
        row = [c.id, *[c.levels[f] for f in FAMILIES], *[c.levels[k] for k in extra], str(len(c.trials))]
        row.append(fmt_stat(mean, std))
        if bpt:
            row.append(fmt_stat(mean * bpt, std * bpt))
        if math.isfinite(c_star):
            v = np.array([loss_at_compute(t, c_star) for t in c.trials])
            v = v[np.isfinite(v)]
            row.append(fmt_stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan) if len(v) else "—")
        flops = np.array([training_flops(t) for t in c.trials], dtype=float)
        row += [
            fmt_stat(*c.stat("val/ppl")[:2], 2),
            *[fmt_stat(*c.stat(k)[:2], 2) for _, k in factors_x],
            f"{float(np.nanmean(flops)):.3g}" if np.isfinite(flops).any() else "—",
            *[fmt_stat(*c.stat(k)[:2], 1) for k in COST_COLUMNS],
            fmt_stat(*c.wall()[:2], 1),
            " ".join(t.short_id for t in c.trials),
        ]
        rows.append(row)
    doc.table(header, rows)


def by_level(configs, factors, levels, curve_of) -> dict[str, dict[str, list]]:
    """factor -> level -> the curves of every run at that level."""
    panels: dict[str, dict[str, list]] = {}
    for f in factors:
        panels[f] = {}
        for lvl in levels[f]:
            runs = [cv for c in configs if level_of(c, f) == lvl for t in c.trials if (cv := curve_of(t)) is not None]
            if runs:
                panels[f][lvl] = runs
    return panels


def val_curve(t: Trial):
    return t.curves.get("val/loss")


def tokens_curve(t: Trial):
    if "val/loss" not in t.curves:
        return None
    steps, loss = t.curves["val/loss"]
    return tokens_at(t, steps), loss


def section_curves(doc: Doc, configs, factors, levels, fl, out: Path) -> list[Path]:
    doc.h(2, "Curves")
    if not any("val/loss" in t.curves for c in configs for t in c.trials):
        doc.p("No `val/loss` curves were logged.")
        return []
    files = []
    floor_note = (
        "Dashed: the n-gram floors (" + ", ".join(f"`{k}` {v:.3f}" for k, v in fl.items()) + ")."
        if fl
        else "No n-gram floors were logged, so none are drawn."
    )
    if not factors:  # one configuration, or nothing varies: one panel of configurations
        arms = {c.label: [t.curves["val/loss"] for t in c.trials if "val/loss" in t.curves] for c in configs}
        panels = {"configuration": {k: v for k, v in arms.items() if v}}
    else:
        panels = by_level(configs, factors, levels, val_curve)
    doc.p(
        "Val loss against the optimizer step, one panel per factor, one line per level: the mean over "
        "every run at that level (all levels of the other factors, all seeds), band ± 1 sd over those "
        "runs. " + floor_note
    )
    files.append(plots.grouped_curves(panels, "optimizer step", "val loss (nats/token)", out / "val_loss_step.png", fl))
    doc.img(files[-1].name, "val loss vs step by factor level")
    if factors:
        tok = by_level(configs, factors, levels, tokens_curve)
        files.append(
            plots.grouped_curves(tok, "training tokens seen", "val loss (nats/token)", out / "val_loss_tokens.png", fl)
        )
        doc.img(files[-1].name, "val loss vs tokens by factor level")
    return files


# ---------------------------------------------------------------------------------------------
# Equal compute


def section_compute(doc: Doc, configs, factors, levels, fl, c_star: float, eff: Effects | None, bpt, out) -> list[Path]:
    doc.h(2, "Equal compute")
    if not math.isfinite(c_star):
        doc.p(compute_missing(c_star))
        return []
    files = []
    doc.p(
        "Arms differ in FLOPs per token (an MoE layer, a SwiGLU width, fewer KV heads), so val loss at "
        "equal steps favours the costlier arms. Here val loss is read against training compute: "
        "3 × `cost/flops_per_token` (forward) × tokens seen, the backward pass costing twice the "
        "forward (Kaplan et al. 2020). The matched compute C* = "
        f"**{c_star:.4g} FLOPs** is the largest compute every configuration reached; each run's val "
        "loss there is interpolated in log compute between its validation points."
    )
    per_arm = {
        "configuration": {
            c.label: runs for c in configs if (runs := [cv for t in c.trials if (cv := loss_vs_compute(t)) is not None])
        }
    }

    def figure(panels, name: str, caption: str) -> None:
        axes = ("training FLOPs", "val loss (nats/token)")
        files.append(plots.grouped_curves(panels, *axes, out / name, fl, log_x=True, vline=c_star))
        doc.img(files[-1].name, caption)

    if len(configs) <= 12:
        figure(per_arm, "val_loss_compute.png", "val loss vs training compute per configuration")
    if factors:
        figure(
            by_level(configs, factors, levels, loss_vs_compute),
            "val_loss_compute_levels.png",
            "val loss vs training compute by factor level",
        )
    if eff is not None:
        doc.h(3, "Effects at matched compute")
        effects_table(doc, eff, bpt, out / "effects_compute.png", files)
    return files


# ---------------------------------------------------------------------------------------------
# Effects


def effects_table(doc: Doc, eff: Effects, bpt, forest: Path | None, files: list[Path]) -> None:
    doc.p(
        f"Response: {eff.what} (negative = better than the reference). " + method_sentence(eff) + " "
        "Cells × seeds: the matched cells of the other factors and the fewest distinct seeds in one of them."
    )
    header = ["factor", "level", "vs", "Δ [95% CI]"]
    if bpt:
        header.append("Δ bits/byte")
    header += ["p", "Holm p", "stands out", "cells × seeds", "interval"]
    rows, pts, sig = [], [], []
    for e in eff.mains:
        row = [e.factor, e.level, e.reference, fmt_ci(e)]
        if bpt:
            row.append(f"{e.estimate * bpt:+.4f}" if math.isfinite(e.estimate) else "—")
        row += [fmt_p(e.p), fmt_p(e.p_holm), "**yes**" if e.significant(ALPHA) else "no"]
        row += [f"{e.n_cells} × {e.n_seeds}", e.method]
        rows.append(row)
        pts.append((f"{e.factor}: {e.level}", e.estimate, e.ci_low, e.ci_high))
        sig.append(e.significant(ALPHA))
    doc.table(header, rows)
    if forest is not None and pts:
        files.append(plots.effects_forest(pts, f"Δ {eff.what} vs reference", forest, sig))
        doc.img(files[-1].name, f"main effects ({eff.what})")
    stand = [i for i in eff.inters if i.significant(ALPHA)]
    tested = sum(math.isfinite(i.p) for i in eff.inters)
    doc.p(
        f"Two-way interactions (a vs a0) × (b vs b0) = (y[a,b] − y[a0,b]) − (y[a,b0] − y[a0,b0]), per seed, "
        f"averaged over the other factors: {len(eff.inters)} computed, {tested} with an interval, "
        f"{len(stand)} stand out after Holm."
    )
    if stand:
        doc.table(
            ["factor a", "level", "factor b", "level", "interaction [95% CI]", "Holm p", "cells × seeds"],
            [
                [
                    i.factor_a,
                    f"{i.level_a} vs {i.reference_a}",
                    i.factor_b,
                    f"{i.level_b} vs {i.reference_b}",
                    fmt_ci(i),
                    fmt_p(i.p_holm),
                    f"{i.n_cells} × {i.n_seeds}",
                ]
                for i in stand
            ],
        )


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


def section_effects(
    doc: Doc, eff: Effects | None, factors, levels, ref, bpt, out, optuna_storage, optuna_study
) -> list[Path]:
    files: list[Path] = []
    doc.h(2, "Factor effects at equal steps")
    if eff is None:
        doc.p("The study has no factor with two or more levels.")
        return files
    n_cells = math.prod(len(levels[f]) for f in factors)
    doc.p(
        "Reference levels: "
        + ", ".join(f"{f} = `{ref[f]}`" for f in factors)
        + f". Design: {len(eff.fac.cells)} of {n_cells} cells of the "
        + " × ".join(str(len(levels[f])) for f in factors)
        + " grid present"
        + ("" if len(eff.fac.cells) == n_cells else "; effects use matched cells only")
        + ". Main effect of a level: the mean over the cells of the other factors of (cell at that "
        "level − cell at the reference), each difference taken within a seed (seed is a block: "
        "configurations with the same seed see the same batches)."
    )
    effects_table(doc, eff, bpt, out / "effects.png", files)
    doc.h(3, "Share of variance")
    shares = variance_shares(eff.fac)
    if shares is not None:
        doc.p(
            "A complete grid: each term's share of the total spread of the runs (η² = SS_term / SS_total, "
            "exact ANOVA; on a grid this replaces a random-forest fANOVA estimate). The interval is on "
            "partial η² = SS_term / (SS_term + SS_error), from the noncentral F (Steiger 2004); it assumes "
            "equal noise in every cell."
        )
        doc.table(
            ["term", "df", "η² (share)", "partial η² [95% CI]"],
            [
                [
                    s.term,
                    str(s.df),
                    f"{s.eta2:.3f}",
                    f"{s.partial:.3f} [{s.partial_low:.3f}, {s.partial_high:.3f}]" if math.isfinite(s.partial) else "—",
                ]
                for s in shares
            ],
        )
        return files
    doc.p(
        "Not a complete grid (some cell lacks a seed, or the design is a path such as one change at a "
        "time), so no exact variance decomposition; see the effects above."
    )
    names = optuna_studies(optuna_storage, optuna_study)
    if names != [optuna_study]:  # a sweep with `per` keeps one Optuna study per point
        doc.p(f"One Optuna study per value of the sweep's `per` dimensions: {', '.join(f'`{n}`' for n in names)}.")
    for name in names:
        imp, why = optuna_importances(optuna_storage, name)
        if imp:
            doc.p(
                f"Optuna fANOVA importances (Hutter et al. 2014) of study `{name}`: **descriptive** — a "
                "random-forest surrogate fitted to the sampled trials, with no interval and no test."
            )
            doc.table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()])
        else:
            doc.p(f"Optuna importances not available: {why}.")
    return files


# ---------------------------------------------------------------------------------------------
# Other sections


def section_extrapolation(doc: Doc, configs, factors_x, out: Path, eff: Effects | None = None) -> list[Path]:
    if not factors_x:
        return []
    doc.h(2, "Length extrapolation")
    doc.p(
        "Perplexity on held-out test text at a multiple of the training context "
        "(`extrap/ppl_x<f>`), mean over seeds; one panel per positional encoding."
    )
    panels: dict[str, dict] = defaultdict(dict)
    for c in configs:
        pts = [(f, c.stat(k)[0]) for f, k in factors_x if c.stat(k)[2]]
        if pts:
            panels[c.levels["pos_enc"]][c.label] = ([p[0] for p in pts], [p[1] for p in pts])
    f = plots.extrapolation(dict(panels), [c.label for c in configs], out / "extrapolation.png")
    doc.img(f.name, "extrapolation")
    files = [f]
    if eff is not None:
        doc.h(3, f"Effects on test log perplexity at ×{factors_x[-1][0]:g} the training length")
        effects_table(doc, eff, None, None, files)
    has_ci = any(f"{k}_lo" in t.metrics for c in configs for t in c.trials for _, k in factors_x)
    if not has_ci:
        doc.p("Per-run intervals (`extrap/ppl_x<f>_lo`, `_hi`) were not logged in this study: none shown.")
        return files
    doc.p(
        "Per-run 95% intervals of the test perplexity (`extrap/ppl_x<f>_lo`, `_hi`, logged by the "
        "evaluation): the seed mean, then the lowest and highest bound over the configuration's runs."
    )
    rows = []
    for c in configs:
        row = [c.id]
        for _, k in factors_x:
            lo = [t.metrics[f"{k}_lo"] for t in c.trials if f"{k}_lo" in t.metrics]
            hi = [t.metrics[f"{k}_hi"] for t in c.trials if f"{k}_hi" in t.metrics]
            mean = c.stat(k)[0]
            row.append(f"{fmt(mean, 2)} [{min(lo):.2f}, {max(hi):.2f}]" if lo and hi else fmt(mean, 2))
        rows.append(row)
    doc.table(["config", *[f"ppl ×{f:g}" for f, _ in factors_x]], rows)
    return files


def section_pareto(doc: Doc, configs, out: Path) -> list[Path]:
    doc.h(2, "Quality vs cost")
    pareto_panels = []
    for key, xlabel, low in (
        ("cost/kv_bytes_per_token", "KV-cache bytes per token", True),
        ("cost/decode_tokens_per_s", "decode tokens/s", False),
    ):
        pts = {
            c.label: (c.stat(key)[0], c.stat("val/loss")[0])
            for c in configs
            if c.stat(key)[2] and c.stat("val/loss")[2]
        }
        if pts:
            pareto_panels.append((xlabel, low, pts))
            labels = list(pts)
            front = plots.pareto_front([pts[k] for k in labels], low)
            doc.p(f"Pareto front, val loss vs {xlabel}: " + ", ".join(labels[i].split(" ")[0] for i in front) + ".")
    if not pareto_panels:
        doc.p("No cost metrics were logged.")
        return []
    f = plots.pareto(pareto_panels, out / "pareto.png")
    doc.img(f.name, "quality vs cost")
    return [f]


def section_tuned(doc: Doc, configs, extra) -> None:
    """A study that varies optimizer settings (tune_lr): per architecture, the best setting
    selected on val, and its test loss reported beside it."""
    opt = [k for k in extra if k.startswith("optimizer.")]
    if not opt:
        return
    doc.h(2, "Tuned hyperparameters")
    doc.p(
        "Per architecture (configurations equal but for "
        + ", ".join(f"`{k}`" for k in opt)
        + "), the setting with the lowest mean final val loss is **selected on val**; its test loss "
        "(log of `extrap/ppl_x1`, the perplexity on held-out test text at the training length) is "
        "**reported on test**. The val loss of the best of n trials is optimistic (it was the "
        "criterion); the test loss is not. `optimizer.lr_from=<this study>` makes a grid train each "
        "arm at its tuned learning rate."
    )
    groups: dict[tuple, list[Configuration]] = defaultdict(list)
    for c in configs:
        groups[tuple((k, v) for k, v in c.levels.items() if k not in opt)].append(c)
    rows = []
    for key, cs in groups.items():
        best = min(cs, key=lambda c: (math.isnan(c.stat("val/loss")[0]), c.stat("val/loss")[0]))
        test = [math.log(t.metrics["extrap/ppl_x1"]) for t in best.trials if "extrap/ppl_x1" in t.metrics]
        rows.append(
            [
                " · ".join(v for k, v in key if k in FAMILIES or not k.startswith("model.")),
                *[best.levels[k] for k in opt],
                str(sum(len(c.trials) for c in cs)),
                fmt_stat(*best.stat("val/loss")[:2]),
                fmt(float(np.mean(test))) if test else "—",
                " ".join(t.short_id for t in best.trials),
            ]
        )
    doc.table(["architecture", *opt, "trials", "val loss (selected on)", "test loss (reported)", "runs"], rows)


def size_factor(factors: Sequence[str]) -> str | None:
    return next((f for f in factors if any(k in f.split(" / ") for k in SIZE_KEYS)), None)


def section_scaling(doc: Doc, configs, factors, reference, out: Path) -> list[Path]:
    """Only when a size factor (model.d_model, model.n_layers) varies."""
    size = size_factor(factors)
    if size is None:
        return []
    doc.h(2, "Scaling")
    size_keys = set(size.split(" / "))
    by_arch: dict[str, list[Trial]] = defaultdict(list)
    arch_levels: dict[str, dict[str, str]] = {}
    for c in configs:
        lv = {k: v for k, v in c.levels.items() if k not in size_keys and (k in FAMILIES or k in factors)}
        name = " · ".join(lv.values())
        by_arch[name].extend(c.trials)
        arch_levels[name] = lv
    points = {
        a: ([float(training_flops(t)) for t in ts], [t.metrics.get("val/loss", math.nan) for t in ts])
        for a, ts in by_arch.items()
    }
    fits = {a: fit_power_law(*p) for a, p in points.items()}
    base_levels = {f: reference.get(f, BASELINE[f]) for f in FAMILIES}
    base = next(
        (a for a, lv in arch_levels.items() if all(lv[f].split("(")[0] == base_levels[f] for f in FAMILIES)), None
    )
    if base is None:  # no GPT-2 baseline in the study: the architecture with the most runs
        base = max(points, key=lambda a: len(points[a][0]))
    doc.p(
        f"Size factor: `{size}`. Training compute C = 3 × `cost/flops_per_token` × tokens seen (no "
        "embedding lookups, no untrained position rows). Fit per architecture: L = a (C / C0)^−b + c, "
        "Huber loss (δ = 10⁻³) on log L as Hoffmann et al. (2022); the offset needs four or more "
        "compute values. Compute multiplier: at the lowest loss L* both fits reach inside their own "
        "compute ranges, C_baseline(L*) / C_arch(L*) (> 1: the change is worth that much compute), "
        "with a 95% bootstrap interval over runs (resampled within each size). None is given outside "
        f"the fitted ranges or when a fit is not identifiable. Baseline: `{base}`."
    )
    rows = []
    for a, fit in fits.items():
        n_c = len(np.unique([c for c in points[a][0] if math.isfinite(c)]))
        if a == base:
            mult = "baseline"
        else:
            m = multiplier_with_interval(points[a], points[base])
            mult = (
                f"{m.value:.2f}× [{m.low:.2f}, {m.high:.2f}] at L* = {m.loss:.3f}"
                if math.isfinite(m.value)
                else f"— ({m.why_not})"
            )
        rows.append(
            [
                a,
                str(len(points[a][0])),
                str(n_c),
                (fit.formula() + ("" if fit.identifiable else " (not identifiable)")) if fit else "—",
                mult,
            ]
        )
    doc.table(["architecture", "runs", "compute values", "fit", "compute multiplier [95% CI]"], rows)
    f = plots.scaling(points, fits, out / "scaling.png")
    doc.img(f.name, "loss vs compute")
    return [f]


def section_reruns(doc: Doc, sel: Selection) -> None:
    if not sel.reruns and not sel.superseded:
        return
    doc.h(2, "Reruns and duplicates")
    doc.p(
        "Left out of every statistic. A rerun (`python -m pipeline.rerun`, tag `rerun_of`) checks a "
        "run; on CPU it reproduces it exactly, so counting it would claim zero noise. An older run "
        "of a (configuration, seed) that has a newer run is superseded by it."
    )
    rows = [
        [r.run_id, "rerun", orig.run_id if orig else r.tags.get("rerun_of", "?") + " (not in the study)", fmt(d)]
        for r, orig, d in sel.rerun_checks()
    ]
    rows += [[t.run_id, "superseded", "", ""] for t in sel.superseded]
    doc.table(["run id", "kind", "original", "|Δ final val loss|"], rows)


def section_runs(doc: Doc, configs, factors_x) -> None:
    doc.h(2, "Runs")
    doc.p("Every run the statistics use, with the values the tables above average.")
    header = [
        "run id",
        "config",
        "seed",
        "git commit",
        "val loss",
        "val ppl",
        *[f"ppl ×{f:g}" for f, _ in factors_x],
        *COST_COLUMNS.values(),
        "wall s",
    ]
    rows = []
    for c in configs:
        for t in c.trials:
            m = t.metrics.get
            rows.append(
                [
                    t.run_id,
                    c.id,
                    t.seed,
                    t.tags.get("git_commit", "?")[:12],
                    fmt(m("val/loss", math.nan)),
                    fmt(m("val/ppl", math.nan), 2),
                    *[fmt(m(k, math.nan), 2) for _, k in factors_x],
                    *[fmt(m(k, math.nan), 1) for k in COST_COLUMNS],
                    fmt(t.wall_s if t.wall_s is not None else math.nan, 1),
                ]
            )
    doc.table(header, rows)


# ---------------------------------------------------------------------------------------------
# Optuna importances, MoE load, failures


def optuna_studies(storage: str, study: str) -> list[str]:
    """The study itself, or the studies `<study>/<point>` a sweep with `per` created."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).exists():
        return [study]  # never create a database by looking
    try:
        import optuna

        names = optuna.get_all_study_names(storage)
    except Exception:  # no storage yet: optuna_importances says why
        return [study]
    per = sorted(n for n in names if n.startswith(f"{study}/"))
    return [study] if study in names or not per else per


def optuna_importances(storage: str, study: str) -> tuple[dict[str, float] | None, str]:
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).exists():
        return None, f"no Optuna storage at `{redact(storage)}`"
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = optuna.load_study(study_name=study, storage=storage)
        # fANOVA named explicitly: Optuna 5's default (PedANOVA) rates every categorical
        # parameter of a small grid equally. A fixed seed keeps rebuilt reports identical.
        fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in optuna.importance.get_param_importances(s, evaluator=fanova).items()}, ""
    except Exception as e:  # a missing study, a grid with one trial, a sampler without params
        return None, f"Optuna study '{study}' in `{redact(storage)}`: {type(e).__name__}: {e}".rstrip(". ")


def section_moe(doc: Doc, configs, out: Path) -> list[Path]:
    loads = {}
    rows = []
    for c in configs:
        cells = defaultdict(list)
        for t in c.trials:
            for k, v in t.metrics.items():
                m = MOE_LOAD.match(k)
                if m:
                    cells[(int(m.group(1)), int(m.group(2)))].append(v)
        if not cells:
            continue
        n_layers = 1 + max(layer for layer, _ in cells)
        n_experts = 1 + max(e for _, e in cells)
        grid = np.full((n_layers, n_experts), np.nan)
        for (layer, e), v in cells.items():
            grid[layer, e] = np.mean(v)
        loads[c.label] = grid
        # max load x n_experts: 1.0 is a perfectly even router, n_experts a collapsed one.
        imbalance = np.nanmax(grid, axis=1) * n_experts
        rows.append(
            [
                c.id,
                str(n_experts),
                " ".join(f"{x:.2f}" for x in imbalance),
                fmt_stat(*c.stat("moe/balance")[:2]),
                fmt_stat(*c.stat("moe/z")[:2]),
            ]
        )
    if not loads:
        return []
    doc.h(2, "Mixture-of-experts load")
    doc.p(
        "Fraction of routing assignments per expert at the last validation step, mean over "
        "seeds (`moe/load/l<layer>/e<expert>`). Imbalance per layer = max load × n_experts "
        "(1 = even)."
    )
    doc.table(["config", "experts", "imbalance per layer", "moe/balance", "moe/z"], rows)
    f = plots.moe_load(loads, out / "moe_load.png")
    doc.img(f.name, "expert load")
    return [f]


def section_failures(doc: Doc, trials: Sequence[Trial]) -> None:
    bad = [t for t in trials if t.status != "FINISHED"]
    doc.h(2, "Failed and pruned trials")
    if not bad:
        doc.p("None: every trial finished.")
        return
    rows = []
    for t in bad:
        if t.status == "KILLED" and t.tags.get("pruned") == "true":
            kind = "pruned"
            reason = (
                t.tags.get("failure_reason")
                or t.tags.get("pruned_reason")
                or ("pruned by the sampler's pruner at val loss " + fmt(t.metrics.get("val/loss", math.nan)))
            )
        elif t.status == "FAILED":
            kind, reason = "failed", t.tags.get("failure_reason", "(no failure_reason tag)")
        else:
            kind, reason = t.status.lower(), t.tags.get("failure_reason", "did not finish")
        steps = t.curves.get("val/loss", ([], []))[0]
        rows.append(
            [
                t.run_id,
                kind,
                " · ".join(t.component(f) for f in FAMILIES),
                t.seed,
                str(int(steps[-1])) if len(steps) else "—",
                reason.replace("\n", " "),
            ]
        )
    doc.table(["run id", "status", "configuration", "seed", "last val step", "reason"], rows)
