"""Architecture ablations of decoder-only language models (see README.md).

Subpackages: `model` (pure PyTorch), `data`, `run` (spec, LightningModule, runner), `tracking`
(MLflow), `evaluate`, `analysis` (the study report), `interop`. The top-level modules `train`,
`rerun`, `cost` and `report` are the command-line entry points.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"  # Hydra configs; studies in conf/ablation/
