"""Side-by-side report of a study, read from MLflow only.

    python -m pipeline.report --study NAME [--tracking-uri URI] [--out reports]

Writes reports/<study>/report.md, report.html and PNGs, and logs them under `report/` to the
study's parent run (the newest run tagged sweep=true; a run named `report` when there is none).
Metrics read: val/loss, val/ppl, train/tokens_seen, extrap/ppl_x<f>, cost/*, moe/load/*; how
trials become configurations is in pipeline.analysis.study. Every number names its run ids.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis import figures as plots
from pipeline.analysis.document import Doc, fmt, fmt_ci, fmt_stat
from pipeline.analysis.powerlaw import compute_multiplier, fit_power_law
from pipeline.analysis.study import (
    BASELINE,
    FAMILIES,
    Configuration,
    Study,
    StudyError,
    Trial,
    factorial,
    factors_and_levels,
    group_configurations,
    load_study,
)
from pipeline.tracking.schema import TRUE, Artifact, Metric, Param, Tag, parse_extrap_ppl, parse_moe_load
from pipeline.tracking.uri import redact

COST_KEYS = (
    Metric.COST_PARAMS_TOTAL,
    Metric.COST_PARAMS_ACTIVE,
    Metric.COST_KV_BYTES_PER_TOKEN,
    Metric.COST_DECODE_TOKENS_PER_S,
    Metric.COST_TRAIN_TOKENS_PER_S,
)


# ---------------------------------------------------------------------------------------------
# Sections


def extrap_factors(configs: Sequence[Configuration]) -> list[tuple[float, str]]:
    keys = {k for c in configs for t in c.trials for k in t.metrics if parse_extrap_ppl(k) is not None}
    return sorted((parse_extrap_ppl(k), k) for k in keys)


def tokens_seen(t: Trial) -> float:
    """Training tokens: the logged counter, else steps x batch x context from the params."""
    if Metric.TRAIN_TOKENS_SEEN in t.metrics:
        return t.metrics[Metric.TRAIN_TOKENS_SEEN]
    try:
        return (
            float(t.params[Param.MAX_STEPS]) * float(t.params[Param.BATCH_SIZE]) * float(t.params[Param.CONTEXT_LENGTH])
        )
    except (KeyError, ValueError):
        return math.nan


def section_table(doc: Doc, configs, extra, factors_x) -> None:
    doc.h(2, "Configurations")
    doc.p(
        "One row per configuration, best final val loss first. Values: mean ± sample std "
        "(ddof = 1) over the n seeds; the run ids (first 8 characters) are the MLflow runs "
        "averaged; the per-run values are in the last section."
    )
    header = [
        "id",
        *FAMILIES,
        *extra,
        "n",
        "val loss",
        "val ppl",
        *[f"ppl ×{f:g}" for f, _ in factors_x],
        "params total",
        "params active",
        "KV B/token",
        "decode tok/s",
        "train tok/s",
        "wall s",
        "runs",
    ]
    rows = []
    for c in configs:
        n = len(c.trials)
        rows.append(
            [
                c.id,
                *[c.levels[f] for f in FAMILIES],
                *[c.levels[k] for k in extra],
                str(n),
                fmt_stat(*c.stat(Metric.VAL_LOSS)[:2]),
                fmt_stat(*c.stat(Metric.VAL_PPL)[:2], 2),
                *[fmt_stat(*c.stat(k)[:2], 2) for _, k in factors_x],
                *[fmt_stat(*c.stat(k)[:2], 1) for k in COST_KEYS],
                fmt_stat(*c.wall()[:2], 1),
                " ".join(t.short_id for t in c.trials),
            ]
        )
    doc.table(header, rows)


def section_plots(doc: Doc, configs, factors_x, out: Path) -> list[Path]:
    files = []
    doc.h(2, "Curves")
    by_step = {c.label: [t.curves[Metric.VAL_LOSS] for t in c.trials if Metric.VAL_LOSS in t.curves] for c in configs}
    by_step = {k: v for k, v in by_step.items() if v}
    if by_step:
        files.append(plots.curves(by_step, "optimizer step", "val loss", out / "val_loss_step.png"))
        doc.img(files[-1].name, "val loss vs step")
        by_tok = {}
        for c in configs:
            runs = []
            for t in c.trials:
                if Metric.VAL_LOSS not in t.curves:
                    continue
                steps, loss = t.curves[Metric.VAL_LOSS]
                if Metric.TRAIN_TOKENS_SEEN in t.curves:
                    tok = np.interp(steps, *t.curves[Metric.TRAIN_TOKENS_SEEN])
                else:  # no counter logged: tokens per step from the params
                    tok = steps * tokens_seen(t) / float(t.params.get(Param.MAX_STEPS, "nan"))
                runs.append((tok, loss))
            if runs:
                by_tok[c.label] = runs
        files.append(plots.curves(by_tok, "training tokens seen", "val loss", out / "val_loss_tokens.png"))
        doc.img(files[-1].name, "val loss vs tokens seen")
    else:
        doc.p(f"No `{Metric.VAL_LOSS}` curves were logged.")
    if factors_x:
        doc.h(2, "Length extrapolation")
        doc.p(
            "Perplexity on held-out text at a multiple of the training context "
            "(`extrap/ppl_x<f>`), mean over seeds; one panel per positional encoding."
        )
        panels: dict[str, dict] = defaultdict(dict)
        for c in configs:
            pts = [(f, c.stat(k)[0]) for f, k in factors_x if c.stat(k)[2]]
            if pts:
                panels[c.levels["pos_enc"]][c.label] = ([p[0] for p in pts], [p[1] for p in pts])
        files.append(plots.extrapolation(dict(panels), [c.label for c in configs], out / "extrapolation.png"))
        doc.img(files[-1].name, "extrapolation")
    doc.h(2, "Quality vs cost")
    pareto_panels = []
    for key, xlabel, low in (
        (Metric.COST_KV_BYTES_PER_TOKEN, "KV-cache bytes per token", True),
        (Metric.COST_DECODE_TOKENS_PER_S, "decode tokens/s", False),
    ):
        pts = {
            c.label: (c.stat(key)[0], c.stat(Metric.VAL_LOSS)[0])
            for c in configs
            if c.stat(key)[2] and c.stat(Metric.VAL_LOSS)[2]
        }
        if pts:
            pareto_panels.append((xlabel, low, pts))
            labels = list(pts)
            front = plots.pareto_front([pts[k] for k in labels], low)
            doc.p(f"Pareto front, val loss vs {xlabel}: " + ", ".join(labels[i].split(" ")[0] for i in front) + ".")
    if pareto_panels:
        files.append(plots.pareto(pareto_panels, out / "pareto.png"))
        doc.img(files[-1].name, "quality vs cost")
    else:
        doc.p("No cost metrics were logged.")
    return files


def section_effects(
    doc: Doc, configs, extra, reference, out: Path, factors_x, optuna_storage: str, optuna_study: str
) -> list[Path]:
    files = []
    doc.h(2, "Factor effects")
    factors, levels, ref = factors_and_levels(configs, extra, reference)
    if not factors:
        doc.p("The study has no factor with two or more levels.")
        return files
    fac = factorial(configs, factors, levels, ref, Metric.VAL_LOSS)
    n_cells = math.prod(len(levels[f]) for f in factors)
    doc.p(
        "Response: final val loss (negative = better than the reference). Reference levels: "
        + ", ".join(f"{f} = `{ref[f]}`" for f in factors)
        + f". Design: {len(fac.cells)} of {n_cells} cells of the "
        + " × ".join(str(len(levels[f])) for f in factors)
        + " grid present"
        + ("" if len(fac.cells) == n_cells else "; effects use matched cells only")
        + "."
    )
    doc.p(
        "Main effect of a level: the mean, over the cells of the other factors, of (cell mean "
        "at that level − cell mean at the reference). 95% interval: "
        + (
            f"t on the pooled within-cell (seed) variance, {fac.pooled_df} df."
            if fac.pooled_df > 0
            else "t over the per-cell differences (no replicate seeds)."
        )
    )
    last = factors_x[-1] if factors_x else None
    fac_x = factorial(configs, factors, levels, ref, last[1], np.log) if last else None
    header = ["factor", "level", "vs", "Δ val loss [95% CI]", "cells"]
    if fac_x:
        header.insert(4, f"Δ log ppl ×{last[0]:g} [95% CI]")
    rows, forest = [], []
    for e in fac.main_effects():
        row = [e.factor, e.level, e.reference, fmt_ci(e), str(e.n_cells)]
        if fac_x:
            row.insert(4, fmt_ci(fac_x.main_effect(e.factor, e.level)))
        rows.append(row)
        forest.append((f"{e.factor}: {e.level}", e.estimate, e.ci_low, e.ci_high))
    doc.table(header, rows)
    if forest:
        files.append(plots.effects_forest(forest, "Δ final val loss vs reference", out / "effects.png"))
        doc.img(files[-1].name, "main effects")
    inter = fac.interactions()
    doc.h(3, "Two-way interactions that stand out")
    stand = [i for i in inter if i.stands_out]
    doc.p(
        f"{len(inter)} two-way contrasts (a vs a0) × (b vs b0) computed as "
        "(y[a,b] − y[a0,b]) − (y[a,b0] − y[a0,b0]), averaged over the other factors; one stands "
        "out when its 95% interval excludes 0 (no interval: when it is at least half the larger "
        f"main effect). {len(stand)} stand out."
    )
    if stand:
        doc.table(
            ["factor a", "level", "factor b", "level", "interaction [95% CI]", "cells"],
            [
                [
                    i.factor_a,
                    f"{i.level_a} vs {i.reference_a}",
                    i.factor_b,
                    f"{i.level_b} vs {i.reference_b}",
                    fmt_ci(i),
                    str(i.n_cells),
                ]
                for i in stand
            ],
        )
    doc.h(3, "Optuna parameter importances")
    names = optuna_studies(optuna_storage, optuna_study)
    if names != [optuna_study]:  # a sweep with `per` keeps one Optuna study per point
        doc.p(f"One Optuna study per value of the sweep's `per` dimensions: {', '.join(f'`{n}`' for n in names)}.")
    for name in names:
        imp, why = optuna_importances(optuna_storage, name)
        if imp:
            doc.p(
                f"fANOVA importances (Hutter et al. 2014) of the parameters of Optuna study `{name}` for its objective."
            )
            doc.table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()])
        else:
            doc.p(f"Not available: {why}.")
    return files


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
                cell = parse_moe_load(k)
                if cell is not None:
                    cells[cell].append(v)
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
                fmt_stat(*c.stat(Metric.MOE_BALANCE)[:2]),
                fmt_stat(*c.stat(Metric.MOE_Z)[:2]),
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
    doc.table(["config", "experts", "imbalance per layer", Metric.MOE_BALANCE, Metric.MOE_Z], rows)
    f = plots.moe_load(loads, out / "moe_load.png")
    doc.img(f.name, "expert load")
    return [f]


def section_scaling(doc: Doc, configs, reference, out: Path) -> list[Path]:
    """Only when an architecture appears at two or more model sizes."""
    by_arch: dict[tuple, list[Trial]] = defaultdict(list)
    for c in configs:
        by_arch[c.arch].extend(c.trials)
    sizes = {a: {t.metrics.get(Metric.COST_PARAMS_ACTIVE) for t in ts} - {None} for a, ts in by_arch.items()}
    if not any(len(s) > 1 for s in sizes.values()):
        return []
    doc.h(2, "Scaling")
    points, fits = {}, {}
    for arch, ts in by_arch.items():
        C = [6.0 * t.metrics.get(Metric.COST_PARAMS_ACTIVE, math.nan) * tokens_seen(t) for t in ts]
        L = [t.metrics.get(Metric.VAL_LOSS, math.nan) for t in ts]
        name = " · ".join(arch)
        points[name] = (C, L)
        fits[name] = fit_power_law(C, L) if len(sizes[arch]) > 1 else None
    base_levels = tuple(reference.get(f, BASELINE[f]) for f in FAMILIES)
    base = next(
        (" · ".join(a) for a in by_arch if tuple(x.split("(")[0] for x in a) == base_levels and fits[" · ".join(a)]),
        None,
    )
    if base is None:  # no GPT-2 baseline in the study: the architecture with the most runs
        fitted = [n for n in fits if fits[n]]
        base = max(fitted, key=lambda n: len(points[n][0])) if fitted else None
    doc.p(
        "Training compute C = 6 · N_active · D (Kaplan et al. 2020), with D the training "
        "tokens seen. Fit per architecture: L = a (C / C0)^−b + c (the offset only with four "
        "or more compute values). Compute multiplier: the compute the baseline needs to reach "
        "the architecture's loss at the baseline's largest compute, divided by that compute "
        f"(> 1: the change is worth that much extra compute). Baseline: `{base}`."
    )
    c_ref = max(points[base][0]) if base else math.nan
    rows = []
    for name, fit in fits.items():
        change = (
            ", ".join(f"{f}: {b} → {a}" for f, a, b in zip(FAMILIES, name.split(" · "), base.split(" · ")) if a != b)
            if base
            else ""
        )
        mult = compute_multiplier(fit, fits[base], c_ref) if fit and base else math.nan
        rows.append(
            [
                name,
                change or ("baseline" if name == base else ""),
                str(len(points[name][0])),
                fit.formula() if fit else "— (one size)",
                "—" if not math.isfinite(mult) else f"{mult:.2f}×",
            ]
        )
    doc.table(["architecture", "change vs baseline", "runs", "fit", "compute multiplier"], rows)
    f = plots.scaling(points, fits, out / "scaling.png")
    doc.img(f.name, "loss vs compute")
    return [f]


def section_failures(doc: Doc, trials: Sequence[Trial]) -> None:
    bad = [t for t in trials if t.status != "FINISHED"]
    doc.h(2, "Failed and pruned trials")
    if not bad:
        doc.p("None: every trial finished.")
        return
    rows = []
    for t in bad:
        if t.status == "KILLED" and t.tags.get(Tag.PRUNED) == TRUE:
            kind = "pruned"
            reason = (
                t.tags.get(Tag.FAILURE_REASON)
                or t.tags.get(Tag.PRUNED_REASON)
                or ("pruned by the sampler's pruner at val loss " + fmt(t.metrics.get(Metric.VAL_LOSS, math.nan)))
            )
        elif t.status == "FAILED":
            kind, reason = "failed", t.tags.get(Tag.FAILURE_REASON, f"(no {Tag.FAILURE_REASON} tag)")
        else:
            kind, reason = t.status.lower(), t.tags.get(Tag.FAILURE_REASON, "did not finish")
        steps = t.curves.get(Metric.VAL_LOSS, ([], []))[0]
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


def section_runs(doc: Doc, configs, factors_x) -> None:
    doc.h(2, "Runs")
    doc.p("Every finished run with the values the tables above average.")
    header = [
        "run id",
        "config",
        "seed",
        "val loss",
        "val ppl",
        *[f"ppl ×{f:g}" for f, _ in factors_x],
        "params total",
        "params active",
        "KV B/token",
        "decode tok/s",
        "train tok/s",
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
                    fmt(m(Metric.VAL_LOSS, math.nan)),
                    fmt(m(Metric.VAL_PPL, math.nan), 2),
                    *[fmt(m(k, math.nan), 2) for _, k in factors_x],
                    *[fmt(m(k, math.nan), 1) for k in COST_KEYS],
                    fmt(t.wall_s if t.wall_s is not None else math.nan, 1),
                ]
            )
    doc.table(header, rows)


# ---------------------------------------------------------------------------------------------
# Entry point


@dataclass
class Report:
    dir: Path
    markdown: Path
    html: Path
    images: list[Path]
    configurations: list[Configuration]
    artifact_run_id: str


def report_run(client, study: Study) -> tuple[str, str]:
    """The run that holds the report: the sweep's newest parent run, else a run named `report`
    (created once, reused by later rebuilds). Returns (run id, a sentence for the report)."""
    if study.parent_run_id:
        return study.parent_run_id, ""
    from mlflow.entities import ViewType

    found = client.search_runs(
        [study.experiment_id], f"tags.{Tag.REPORT} = '{TRUE}'", ViewType.ACTIVE_ONLY, max_results=1
    )
    run_id = (
        found[0].info.run_id
        if found
        else client.create_run(
            study.experiment_id, run_name="report", tags={Tag.REPORT: TRUE, Tag.STUDY: study.name}
        ).info.run_id
    )
    return run_id, (
        f" No sweep parent run (tag `sweep=true`) was found, so the report is logged "
        f"to run `{run_id}` (named `report`)."
    )


def build_report(
    study_name: str,
    tracking_uri: str | None = None,
    out: str | Path = "reports",
    reference: dict[str, str] | None = None,
    optuna_storage: str | None = None,
    log_artifacts: bool = True,
) -> Report:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.uri import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)  # explicit > MLFLOW_TRACKING_URI > ./mlflow.db
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise StudyError(
            f"no MLflow store at {uri}; run a study first (make ablate) or pass "
            "--tracking-uri / set MLFLOW_TRACKING_URI"
        )
    check_store(uri, "MLflow store")
    client = MlflowClient(tracking_uri=uri)
    study = load_study(client, study_name, redact(uri))  # the report shows the URI: no password
    # The Optuna study: the one the sweep recorded on its parent run ("<storage>#<name>"), else
    # the study's name in --optuna-storage / ./optuna.db.
    optuna_study = study_name
    if optuna_storage is None and "#" in study.parent_tags.get(Tag.OPTUNA_STUDY, ""):
        optuna_storage, _, optuna_study = study.parent_tags[Tag.OPTUNA_STUDY].rpartition("#")
    optuna_storage = optuna_storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    configs, extra = group_configurations(study.trials)
    out_dir = Path(out) / study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()

    target, note = report_run(client, study) if log_artifacts else (None, "")

    factors_x = extrap_factors(configs)
    n_failed = sum(t.status == "FAILED" for t in study.trials)
    n_pruned = sum(t.tags.get(Tag.PRUNED) == TRUE for t in study.trials)
    doc = Doc(out_dir)
    doc.h(1, f"Study `{study_name}`")
    doc.p(
        f"Read from MLflow `{uri}`, experiment `{study_name}` (id {study.experiment_id})"
        + (f", parent run `{study.parent_run_id}`." if study.parent_run_id else ".")
        + note
        + f" {sum(len(c.trials) for c in configs)} finished trials in {len(configs)} "
        f"configurations; {n_failed} failed, {n_pruned} pruned. Generated "
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}."
    )
    section_table(doc, configs, extra, factors_x)
    images = section_plots(doc, configs, factors_x, out_dir)
    images += section_effects(doc, configs, extra, reference or {}, out_dir, factors_x, optuna_storage, optuna_study)
    images += section_moe(doc, configs, out_dir)
    images += section_scaling(doc, configs, reference or {}, out_dir)
    section_failures(doc, study.trials)
    section_runs(doc, configs, factors_x)

    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(doc.markdown())
    page.write_text(doc.html(f"Study {study_name}"))
    if log_artifacts:
        client.log_artifacts(target, str(out_dir), artifact_path=Artifact.REPORT)
    return Report(out_dir, md, page, images, configs, target or "")
