"""From the composed Hydra config to typed objects: the pieces every command shares.

Kept free of Lightning and MLflow so that `pipeline.cost` and error paths start fast.
"""

from __future__ import annotations

from typing import Any

from pipeline.model import ModelConfig


def model_from_config(c: dict[str, Any]) -> tuple[ModelConfig, str | None]:
    """The ModelConfig a run builds from the resolved root config, and its preset name (a tag).

    A learned position table gets max(eval.factors) x context_length rows, so extrapolation
    can score every factor (rows past the training length are never trained).
    """
    model = dict(c["model"])
    preset = model.pop("preset", None)
    factors = list((c.get("eval") or {}).get("factors") or [1])
    pos = model.get("pos_enc") or {}
    if pos.get("name") == "learned" and pos.get("max_len") is None:
        valid = all(isinstance(f, int) and f >= 1 for f in factors)
        model["pos_enc"] = {**pos, "max_len": (max(factors) if valid else 1) * model.get("context_length", 1)}
    return ModelConfig.from_dict(model), preset


def resolve_budget(argv: list[str]) -> list[str]:
    """`budget=auto` (also the default on the command line): gpu when CUDA is present, else cpu."""
    import torch

    choice = "gpu" if torch.cuda.is_available() else "cpu"
    rest = [a for a in argv if a != "budget=auto"]
    if any(a.startswith("budget=") for a in rest):
        return argv
    return rest + [f"budget={choice}"]
