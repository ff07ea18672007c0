"""The comparison report of a study, from MLflow:  python -m pipeline.report --study NAME

Sections and their statistics: `pipeline.analysis.report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.analysis.report import build_report
from pipeline.analysis.study import StudyError
from pipeline.names import BadName, check_name
from pipeline.tracking.uri import StoreError


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True, help="study name = MLflow experiment name")
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    ap.add_argument("--out", default="reports", help="output folder (default: reports)")
    ap.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FACTOR=LEVEL",
        help="reference level of a factor for the effects (default: GPT-2's)",
    )
    ap.add_argument("--optuna-storage", help="default: sqlite:///optuna.db in the working dir")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    args = ap.parse_args(argv)
    reference = {}
    for item in args.reference:
        if "=" not in item:
            ap.error(f"--reference {item!r}: expected FACTOR=LEVEL, e.g. pos_enc=rope")
        k, v = item.split("=", 1)
        reference[k] = v
    try:
        check_name("--study", args.study)  # reports/<study>/ is a folder: no '/', no '..'
        rep = build_report(args.study, args.tracking_uri, args.out, reference, args.optuna_storage, not args.no_log)
    except (StudyError, BadName, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {rep.markdown} and {rep.html} ({len(rep.images)} figures)"
        + (f"; logged to run {rep.artifact_run_id} under report/" if rep.artifact_run_id else "")
    )
    print("\n".join(rep.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
