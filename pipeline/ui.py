"""The MLflow UI over the pipeline's store, opened on the studies:  python -m pipeline.ui [--port 5000]

Prints the address of every study's runs table (the four components, seed, val loss,
extrapolation and cost columns; every trial a row, best val loss first) and of its chart view,
then serves `mlflow ui` on 127.0.0.1. What the addresses hold: pipeline.tracking.views.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.model.families import FAMILIES
from pipeline.tracking.uri import resolve_tracking_uri
from pipeline.tracking.views import runs_table_url, set_up_experiment


def study_experiments(client) -> list:
    """Experiments holding pipeline runs (every run the pipeline logs carries the `study` tag)."""
    return [
        e
        for e in client.search_experiments()
        if client.search_runs([e.experiment_id], "tags.study IS NOT NULL", max_results=1)
    ]


def addresses(uri: str, base: str) -> list[str]:
    """Lines naming each study's runs table and chart view. A study logged before the views
    existed, or by an older version of them, gets the current ones here (experiment tags only;
    no run is touched)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return [f"no MLflow store at {uri} yet: run a study (make ablate) and open {base}"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    studies = study_experiments(client)
    if not studies:
        return [f"no study in {uri} yet: run one (make ablate) and open {base}"]
    width = max(len(e.name) for e in studies)
    lines = [f"Studies in {uri} (runs table: every trial a row, best val/loss first):"]
    for e in sorted(studies, key=lambda e: e.name):
        set_up_experiment(client, e.experiment_id)  # writes only what is missing or outdated
        lines.append(f"  {e.name:<{width}}  runs    {runs_table_url(base, e.experiment_id)}")
        lines.append(f"  {'':<{width}}  charts  {runs_table_url(base, e.experiment_id, charts=True)}")
    lines.append(
        "Grouped by a component (mean per level): Views > 'grouped by <family>' on a runs table, "
        f"or viewStateShareKey=by-<family> in its address ({', '.join(FAMILIES)})."
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.ui", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    ap.add_argument("--no-serve", action="store_true", help="print the addresses and exit")
    args = ap.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    print("\n".join(addresses(uri, f"http://{args.host}:{args.port}")), flush=True)
    if args.no_serve:
        return 0
    # exec: the server takes this process over, so Ctrl-C and a signal to `make ui` reach it.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, [*cmd, "--backend-store-uri", uri])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
