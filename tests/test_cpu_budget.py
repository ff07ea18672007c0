"""The CPU budget trains models that use their positions (issue 16), through the real CLI.

At `budget=cpu` (600 steps of 16 x 64 tokens, d_model 64) the ALiBi paper's ordering holds on
the embedded corpus for each FFN of full_grid: ALiBi's ppl_x4 / ppl_x1 stays below 1.25, and
learned positions' median over the three FFNs is more than twice ALiBi's (issue 16's target, a
median over arms as in `make bench-sweep`). Each arm alone must reach 1.75x: the learned GELU arm
sits near 2x (2.03 against 0.99 in full_grid's gpt2-shaped trial; 1.98x its median over norms
and attentions),
so 2x per arm would test the machine's rounding. With GPT-2's fixed init 0.02 at this width the
gated arms stopped at the bigram floor (val loss 2.59-2.62 against 2.635) and learned positions
scored 1.10-1.11: a model that has not learned positions cannot fail to extrapolate them. Slow: six
600-step runs, two at a time (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers.cli import cli

FFNS = ("gelu", "swiglu", "moe")
ARMS = [(pos_enc, ffn) for ffn in FFNS for pos_enc in ("learned", "alibi")]
BIGRAM_MARGIN = 0.3  # nats below the 2-gram floor of the held-out text: past bigram statistics


def train(folder: Path, pos_enc: str, ffn: str) -> dict[str, float | str]:
    """One run at the CPU budget in its own folder (own store); its final metrics and init."""
    folder.mkdir()
    args = [f"model/pos_enc={pos_enc}", f"model/ffn={ffn}", "budget=cpu", "trainer.enable_progress_bar=false"]
    args.append("tracking.system_metrics=false")
    proc = cli("pipeline.train", args, folder, env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    return {**run.data.metrics, "init_std": run.data.params["model.init_std"]}


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, float | str]]:
    root = tmp_path_factory.mktemp("cpu_budget")
    with ThreadPoolExecutor(2) as pool:  # two 1-thread processes: the layout make ablate uses on 2 cores
        results = pool.map(lambda arm: train(root / "-".join(arm), *arm), ARMS)
        return dict(zip(ARMS, results, strict=True))


def ratio(m: dict[str, float | str]) -> float:
    return float(m["extrap/ppl_x4"]) / float(m["extrap/ppl_x1"])


@pytest.mark.slow
def test_cpu_budget_reproduces_the_alibi_ordering(budget_runs) -> None:
    learned = statistics.median(ratio(budget_runs[("learned", f)]) for f in FFNS)
    alibi = statistics.median(ratio(budget_runs[("alibi", f)]) for f in FFNS)
    assert alibi < 1.25 and learned > 2 * alibi, (learned, alibi)


@pytest.mark.slow
@pytest.mark.parametrize("ffn", FFNS)
def test_learned_positions_fail_beyond_the_context_with_every_ffn(budget_runs, ffn: str) -> None:
    alibi, learned = ratio(budget_runs[("alibi", ffn)]), ratio(budget_runs[("learned", ffn)])
    assert alibi < 1.25 and learned > 1.75 * alibi, (learned, alibi)


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS, ids="-".join)
def test_cpu_budget_models_learn_past_bigram_statistics(budget_runs, arm: tuple[str, str]) -> None:
    m = budget_runs[arm]
    assert float(m["val/loss"]) < float(m["floor/ngram2"]) - BIGRAM_MARGIN
    assert float(m["init_std"]) == pytest.approx(math.sqrt(2 / (5 * 64)))  # the width-aware default, logged
