"""Side-by-side report of a study, read from MLflow only.

    python -m pipeline.report --study NAME [--tracking-uri URI] [--out reports]

Writes reports/<study>/report.md, report.html and PNGs, and logs them under `report/` to the
study's parent run (the newest run tagged sweep=true; a run named `report` when there is none),
whose description (shown in the MLflow UI) then links report.html and summarises the study.
Metrics read: val/loss, val/ppl, train/tokens_seen, extrap/ppl_x<f> (and _lo/_hi), floor/ngram<n>,
cost/*, moe/load/*. How trials become configurations and replicates: pipeline.analysis.study;
the effects' statistics: pipeline.analysis.effects. Every number names its run ids.

Order: a summary first (what stands out after the multiplicity correction, at equal steps and
at equal compute; whether the training budget was adequate), then the evidence.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis.compute import loss_at_compute, matched_compute
from pipeline.analysis.document import Doc
from pipeline.analysis.sections import (
    Effects,
    bits_per_nat_token,
    extrap_factors,
    floors,
    optuna_importances,
    optuna_studies,
    read_effects,
    section_budget,
    section_compute,
    section_curves,
    section_effects,
    section_extrapolation,
    section_failures,
    section_moe,
    section_pareto,
    section_reruns,
    section_runs,
    section_scaling,
    section_summary,
    section_table,
    section_tuned,
)
from pipeline.analysis.study import (
    Configuration,
    Selection,
    Study,
    StudyError,
    factorial,
    factors_and_levels,
    group_configurations,
    load_study,
    select_replicates,
)
from pipeline.analysis.summary import description, summary
from pipeline.tracking.schema import TRUE, Artifact, Tag
from pipeline.tracking.uri import redact

__all__ = ["Report", "build_report", "optuna_importances", "optuna_studies", "report_run"]


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
    at_steps: Effects | None = None
    at_compute: Effects | None = None
    matched_compute: float = math.nan
    selection: Selection | None = None
    summary: tuple[str, str] = ("", "")  # best configuration; significant factors (the run's description)


def build_report(
    study_name: str,
    tracking_uri: str | None = None,
    out: str | Path = "reports",
    reference: dict[str, str] | None = None,
    optuna_storage: str | None = None,
    log_artifacts: bool = True,
) -> Report:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import views
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
    if optuna_storage is None and "#" in study.parent_tags.get("optuna_study", ""):
        optuna_storage, _, optuna_study = study.parent_tags["optuna_study"].rpartition("#")
    optuna_storage = optuna_storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    sel = select_replicates(study.trials)
    configs, extra = group_configurations(sel.used)
    out_dir = Path(out) / study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()

    target, note = report_run(client, study) if log_artifacts else (None, "")

    # The analyses first: the summary at the top reads them.
    reference = reference or {}
    factors, levels, ref = factors_and_levels(configs, extra, reference) if configs else ([], {}, {})
    at_steps = read_effects("final val loss", factorial(configs, factors, levels, ref, "val/loss")) if factors else None
    c_star = matched_compute([c.trials for c in configs])
    at_compute = None
    if factors and math.isfinite(c_star):
        fac_c = factorial(configs, factors, levels, ref, "", value_of=lambda t: loss_at_compute(t, c_star))
        if fac_c.cells:
            at_compute = read_effects(f"val loss at matched compute {c_star:.3g} FLOPs", fac_c)
    bpt = bits_per_nat_token(sel.used)
    fl = floors(sel.used)
    factors_x = extrap_factors(configs)
    at_extrap = None  # a family of its own: a different response
    if factors and factors_x:
        f_max, key = factors_x[-1]
        fac_x = factorial(configs, factors, levels, ref, key, transform=np.log)
        at_extrap = read_effects(f"test log perplexity at ×{f_max:g} the training length", fac_x)

    n_failed = sum(t.status == "FAILED" for t in study.trials)
    n_pruned = sum(t.tags.get("pruned") == "true" for t in study.trials)
    doc = Doc(out_dir)
    doc.h(1, f"Study `{study_name}`")
    doc.p(
        f"Read from MLflow `{uri}`, experiment `{study_name}` (id {study.experiment_id})"
        + (f", parent run `{study.parent_run_id}`." if study.parent_run_id else ".")
        + note
        + f" {len(sel.used)} runs used in {len(configs)} configurations; {n_failed} failed, "
        f"{n_pruned} pruned. Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}."
    )
    section_summary(doc, sel, configs, at_steps, at_compute, c_star, bpt)
    if bpt is None:
        doc.p("Bits per byte: not shown; the tokenizer is not the byte tokenizer and bytes per token are not logged.")
    section_budget(doc, configs, fl)
    section_table(doc, configs, extra, factors_x, bpt, c_star)
    images = section_curves(doc, configs, factors, levels, fl, out_dir)
    images += section_compute(doc, configs, factors, levels, fl, c_star, at_compute, bpt, out_dir)
    images += section_effects(doc, at_steps, factors, levels, ref, bpt, out_dir, optuna_storage, optuna_study)
    images += section_extrapolation(doc, configs, factors_x, out_dir, at_extrap)
    images += section_pareto(doc, configs, out_dir)
    images += section_moe(doc, configs, out_dir)
    images += section_scaling(doc, configs, factors, reference, out_dir)
    section_tuned(doc, configs, extra)
    section_failures(doc, study.trials)
    section_reruns(doc, sel)
    section_runs(doc, configs, factors_x)

    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(doc.markdown())
    page.write_text(doc.html(f"Study {study_name}"))
    lines = summary(configs, extra, reference or {})
    if log_artifacts:
        client.log_artifacts(target, str(out_dir), artifact_path=Artifact.REPORT)
        link = views.artifact_link(study.experiment_id, target, f"{Artifact.REPORT}/{page.name}")
        client.set_tag(target, views.DESCRIPTION, description(lines, link, f"{Artifact.REPORT}/{page.name}"))
    return Report(out_dir, md, page, images, configs, target or "", at_steps, at_compute, c_star, sel, lines)
