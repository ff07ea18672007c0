"""What a run records in MLflow: every tag, metric, param and artifact name, and its format.

The one home of these names. Writers (run/, evaluate/, tracking/) and readers (analysis/, the
report, users' queries) import them from here; a patterned name (`moe/load/l{i}/e{j}`,
`extrap/ppl_x{f}`) comes with its builder and its parser, side by side. Imports nothing heavy
(no torch, no mlflow): the report reads it without torch.

Layout of a study in MLflow: one experiment per study; a sweep is a parent run (tag
`sweep=true`), each trial a child run (MLflow's `mlflow.parentRunId`). Metrics are floats;
curves are logged at step = optimizer step; losses are in nats per token.
"""

from __future__ import annotations

import re

from pipeline.model.families import FAMILIES

TRUE = "true"  # how a boolean tag is written (false: "false", or the tag is absent)


class Tag:
    """Tags. Every training run carries FAMILIES (one tag per component family, the registry
    name: `pos_enc=rope`), PLACEMENT, STUDY, SEED and GIT_COMMIT, and PRESET when it started
    from one."""

    FAMILIES = FAMILIES
    PLACEMENT = "placement"  # pre | post (the block's norm placement)
    PRESET = "preset"
    STUDY = "study"
    SEED = "seed"
    GIT_COMMIT = "git_commit"  # HEAD sha, `-dirty` with uncommitted tracked changes, `unknown` outside git
    TRIAL = "trial"  # the trial's number within its sweep (child runs only)
    CACHE_HIT = "cache_hit"  # TRUE when the tokenized splits came from the cache
    EVAL_DEVICE = "eval_device"  # where evaluation ran (`cuda:0`, `cpu`): the trainer's device
    RERUN_OF = "rerun_of"  # run id of the run `pipeline.rerun` started from
    LR_FROM = "lr_from"  # the tune study optimizer.lr_from named (pipeline.tracking.tuned)
    LR_FROM_RUN = "lr_from_run"  # the run of that study whose lr and warmup this run took
    # How a run ended (status FAILED or KILLED)
    FAILURE_REASON = "failure_reason"  # `<ExceptionType>: <message>`, cut to FAILURE_REASON_MAX
    PRUNED = "pruned"  # TRUE on a run stopped by the Optuna pruner (status KILLED)
    PRUNED_REASON = "pruned_reason"  # `val/loss=<value> at step <step>`
    # The sweep's parent run
    SWEEP = "sweep"  # TRUE on a sweep's parent run
    SWEEPER = "sweeper"  # optuna | basic
    WORKER = "worker"  # host:pid of the process that runs the sweep (a dead one's children are killed)
    OPTUNA_STUDY = "optuna_study"  # `<storage>#<study name>`: identifies a resumable Optuna sweep
    BEST_RUN_ID = "best_run_id"
    BEST_RUN_NAME = "best_run_name"
    BEST_TRIAL = "best_trial"  # Optuna trial number
    BEST_PARAMS = "best_params"  # JSON of the best trial's sampled overrides
    # The run that holds a report when the study has no sweep parent run
    REPORT = "report"  # TRUE
    # MLflow's own
    PARENT_RUN_ID = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    DESCRIPTION = "mlflow.note.content"  # markdown shown on the run's page (the report's run: a link and a summary)
    # Experiment tags MLflow's UI reads (pipeline.tracking.views writes them)
    EXPERIMENT_KIND = "mlflow.experimentKind"  # custom_model_development: the model-training pages
    SAVED_VIEW_PREFIX = "mlflow.sharedViewState."  # + key: a runs-table view, opened by ?viewStateShareKey=key


FAILURE_REASON_MAX = 5000  # characters kept of a failure reason (MLflow's tag limit is 8000)
# Optuna user attribute of a sweep trial: the run id of its child run, so that a worker that
# finds the trial stale (its worker lost) ends that run KILLED (pipeline.tracking.sweep).
TRIAL_RUN_ATTR = "mlflow_run_id"


class Metric:
    """Metrics with a fixed name. Patterned ones are built (and parsed back) by the functions
    below: moe_load, extrap_ppl (+ _lo/_hi), floor_ngram, cost, sweep_runs, sweep_outcome."""

    # Curves, step = optimizer step
    TRAIN_LOSS = "train/loss"  # cross-entropy of the training batch
    TRAIN_TOKENS_SEEN = "train/tokens_seen"  # tokens trained on so far
    LR = "lr"
    EPOCH = "epoch"  # Lightning's own, logged beside every metric it logs
    VAL_LOSS = "val/loss"  # mean over the fixed validation batches; the sweep objective
    VAL_PPL = "val/ppl"  # exp(val/loss)
    # Mixture of experts (MoE runs only), per training step
    MOE_BALANCE = "moe/balance"  # Switch load-balancing loss (Fedus et al. 2021), before its coefficient
    MOE_Z = "moe/z"  # router z-loss (Zoph et al. 2022, ST-MoE), before its coefficient
    MOE_DROPPED = "moe/dropped"  # share of assignments over the capacity factor
    # Evaluation, once after training
    EVAL_SECONDS = "eval/seconds"  # wall time of the whole evaluation (its share of a trial)
    TRAIN_SECONDS = "train/seconds"  # wall time of training (with eval/seconds: a trial's overhead)
    # Inference cost (pipeline.evaluate.cost): analytic ...
    COST_PARAMS_TOTAL = "cost/params_total"
    COST_PARAMS_ACTIVE = "cost/params_active"  # per token: top_k of n_experts for MoE
    COST_FLOPS_PER_TOKEN = "cost/flops_per_token"  # forward FLOPs per token at the training context
    COST_KV_BYTES_PER_TOKEN = "cost/kv_bytes_per_token"  # 2 * n_layers * n_kv_heads * head_dim * bytes
    # ... and measured (for the first decode batch size; cost("decode_tokens_per_s_b8") for others)
    COST_DECODE_TOKENS_PER_S = "cost/decode_tokens_per_s"
    COST_PREFILL_TOKENS_PER_S = "cost/prefill_tokens_per_s"
    COST_PEAK_MEM_BYTES = "cost/peak_mem_bytes"
    COST_TRAIN_TOKENS_PER_S = "cost/train_tokens_per_s"  # training throughput, warm-up steps excluded
    COST_MFU = "cost/mfu"  # training FLOP/s (3 x forward FLOPs per token) / peak FLOP/s
    COST_PEAK_FLOPS = "cost/peak_flops"  # the peak cost/mfu divides by (trainer.peak_flops or the datasheet's)
    # The sweep's parent run
    SWEEP_BEST_VAL_LOSS = "sweep/best_val_loss"  # min val/loss over its FINISHED children


class Param:
    """Params are the resolved config flattened to dotted keys (`model.attention.n_kv_heads`);
    these are the ones read back by name."""

    DATA_OVERLAP_VAL_TRAIN = "data.overlap.val_train"  # share of val 64-byte windows found in train
    DATA_OVERLAP_TEST_TRAIN = "data.overlap.test_train"
    SEED = "seed"
    MAX_STEPS = "trainer.max_steps"
    BATCH_SIZE = "data.batch_size"
    CONTEXT_LENGTH = "model.context_length"

    @staticmethod
    def component(family: str) -> str:
        """`model.<family>.name`: the component a run used, as a param."""
        return f"model.{family}.name"


class Artifact:
    """Artifact paths within a run."""

    CONFIG = "config.yaml"  # the resolved config; pipeline.rerun starts from it
    OVERRIDES = "overrides.txt"  # the command-line overrides, one a line
    PLOTS = "plots"  # folder: loss_curve.png, extrapolation.png, evaluation.json
    REPORT = "report"  # folder on the sweep's parent run: report.md, report.html, PNGs
    SWEEP_SUMMARY_JSON = "sweep_summary.json"  # on the sweep's parent run
    SWEEP_SUMMARY_TXT = "sweep_summary.txt"


# -- patterned metric names: builder and parser side by side ------------------------------------

_MOE_LOAD = re.compile(r"^moe/load/l(\d+)/e(\d+)$")
_EXTRAP_PPL = re.compile(r"^extrap/ppl_x([0-9.]+)$")
# Every patterned name below, plus MLflow's own system metrics (`system/cpu_utilization_percentage`).
_PATTERNED = re.compile(
    r"^(moe/load/l\d+/e\d+|extrap/ppl_(sliding_)?x[0-9.]+(_rope_[a-z]+)?(_lo|_hi)?|floor/ngram\d+"
    r"|cost/[a-z0-9_]+|sweep/[a-z0-9_]+|system/.+)$"
)


def moe_load(layer: int, expert: int) -> str:
    """Share of routing assignments that went to `expert` of MoE layer `layer` (0-based),
    averaged over the training steps since the previous validation."""
    return f"moe/load/l{layer}/e{expert}"


def parse_moe_load(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a moe_load name; None for any other name."""
    m = _MOE_LOAD.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def extrap_ppl(factor: float) -> str:
    """Perplexity on held-out text in windows of `factor` x the training context (Press et al.
    2022), non-overlapping windows. Variants of the same measurement add a suffix
    (`extrap/ppl_sliding_x{f}`, `extrap/ppl_x{f}_rope_{method}`); extrap_ppl_lo/_hi its 95% interval."""
    return f"extrap/ppl_x{factor:g}"


def extrap_ppl_lo(factor: float) -> str:
    return f"{extrap_ppl(factor)}_lo"


def extrap_ppl_hi(factor: float) -> str:
    return f"{extrap_ppl(factor)}_hi"


def extrap(key: str) -> str:
    """`extrap/<key>` for a key of pipeline.evaluate.extrapolation's result (`ppl_x2`,
    `ppl_sliding_x2`, `ppl_x2_rope_ntk`)."""
    return f"extrap/{key}"


def parse_extrap_ppl(name: str) -> float | None:
    """The factor of an extrap_ppl name (not its variants or intervals); None for any other name."""
    m = _EXTRAP_PPL.match(name)
    return float(m.group(1)) if m else None


def floor_ngram(n: int) -> str:
    """Val loss (nats/token) of a smoothed n-gram model of the train split: a floor that a
    trained model should beat."""
    return f"floor/ngram{n}"


def cost(key: str) -> str:
    """`cost/<key>` for a key of pipeline.evaluate.cost's analytic or measured results."""
    return f"cost/{key}"


def sweep_runs(status: str) -> str:
    """Number of a sweep's child runs with this MLflow status (FINISHED -> sweep/runs_finished)."""
    return f"sweep/runs_{status.lower()}"


def sweep_outcome(outcome: str) -> str:
    """Number of an Optuna sweep's trials with this outcome (complete, pruned, failed, skipped)."""
    return f"sweep/{outcome}"


def is_metric(name: str) -> bool:
    """True for a metric name this schema defines, fixed or patterned."""
    return name in _FIXED or _PATTERNED.match(name) is not None


_FIXED = {v for k, v in vars(Metric).items() if k.isupper()}
