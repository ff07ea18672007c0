"""The MLflow schema: patterned names parse back to what built them; a real run logs only
names the schema defines."""

from __future__ import annotations

import pytest

from pipeline.tracking import schema
from pipeline.tracking.schema import Metric


@pytest.mark.parametrize("layer,expert", [(0, 0), (3, 7), (11, 63)])
def test_moe_load_name_parses_back(layer: int, expert: int) -> None:
    assert schema.parse_moe_load(schema.moe_load(layer, expert)) == (layer, expert)


@pytest.mark.parametrize("factor", [1, 2, 8, 0.5, 1.5])
def test_extrap_name_parses_back_to_its_factor(factor: float) -> None:
    assert schema.parse_extrap_ppl(schema.extrap_ppl(factor)) == factor


@pytest.mark.parametrize(
    "name",
    [
        schema.extrap_ppl_lo(2),
        schema.extrap_ppl_hi(2),
        schema.extrap("ppl_sliding_x2"),
        schema.extrap("ppl_x2_rope_ntk"),
        "moe/load/l0",
        Metric.VAL_PPL,
    ],
)
def test_parsers_reject_other_names(name: str) -> None:
    # An interval or a variant of the extrapolation score is not a factor of the main one.
    assert schema.parse_extrap_ppl(name) is None and schema.parse_moe_load(name) is None


def test_extrap_builder_and_evaluation_keys_agree() -> None:
    # evaluate_run logs extrap(<key of extrapolation()>); the key for factor 4 is ppl_x4.
    assert schema.extrap("ppl_x4") == schema.extrap_ppl(4) == "extrap/ppl_x4"


@pytest.mark.parametrize(
    "name,known",
    [
        (Metric.VAL_LOSS, True),
        (schema.moe_load(1, 2), True),
        (schema.extrap_ppl_hi(8), True),
        (schema.floor_ngram(3), True),
        (schema.cost("decode_tokens_per_s_b8"), True),
        (schema.sweep_runs("FINISHED"), True),
        ("val_loss", False),
        ("extrap/ppl_y2", False),
        ("loss", False),
    ],
)
def test_is_metric(name: str, known: bool) -> None:
    assert schema.is_metric(name) is known


def test_every_metric_of_a_real_run_is_in_the_schema(tmp_path, tiny) -> None:
    """A tiny MoE run with evaluation: a metric logged under a literal the schema lacks fails here."""
    from mlflow import MlflowClient

    from tests.helpers.cli import cli

    proc = cli("pipeline.train", [*tiny, "model=mixtral", "model.ffn.n_experts=2", "eval.factors=[1,2]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    names = set(run.data.metrics)
    assert {Metric.VAL_LOSS, Metric.MOE_BALANCE, schema.moe_load(0, 1), schema.extrap_ppl(2)} <= names
    assert [n for n in names if not schema.is_metric(n)] == []
    for family in schema.Tag.FAMILIES:
        assert run.data.tags[family] == run.data.params[schema.Param.component(family)]
