"""A study as MLflow holds it: its trials, and their configurations with the seeds pooled.

Schema read (pipeline.tracking.schema): experiment = study; trials are the experiment's runs other than the
sweep parents (tag sweep=true); tags pos_enc/norm/attention/ffn/seed; params = the resolved
config flattened to dotted keys. A configuration is a trial's params minus the run-specific
ones (seeds, tracking, paths), so the seeds of one configuration are pooled.

The unit of replication is a distinct seed (`select_replicates`): one run per (configuration,
seed), the newest; a run tagged `rerun_of` is a check of another run, never a replicate (on CPU
it reproduces its original exactly, and counting it would claim zero noise).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.analysis.effects import Factorial
from pipeline.model.families import FAMILIES
from pipeline.model.presets import ARCHITECTURES
from pipeline.tracking.schema import TRUE, Metric, Param, Tag

# Default reference levels: the GPT-2 baseline, the question being "what does RoPE buy over
# learned positions, RMSNorm over LayerNorm, ...". A family whose GPT-2 level is not in the
# study falls back to its first level in alphabetical order.
BASELINE = {f: ARCHITECTURES["gpt2"][f]["name"] for f in FAMILIES}
# Params that differ between the seeds of one configuration (matched on the dotted key's last
# part, or its first part for whole subtrees).
RUN_SPECIFIC_LEAVES = {
    "seed",
    "trial",
    "run_name",
    "run_id",
    "output_dir",
    "git_commit",
    "study",
    "ablation",
    "tracking_uri",
}
RUN_SPECIFIC_ROOTS = {"tracking", "hydra", "paths", "sweep"}
# An extra param with more distinct values than this was sampled (TPE over a learning rate),
# not laid out as a grid: it is a column of the tables, not a factor of the effects.
MAX_GRID_LEVELS = 6

# ---------------------------------------------------------------------------------------------
# Reading MLflow


class StudyError(LookupError):
    """The study cannot be read as asked (no store, no experiment, a reference level it lacks)."""


@dataclass
class Trial:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | SCHEDULED
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each key
    wall_s: float | None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (steps, values)

    @property
    def seed(self) -> str:
        return self.tags.get(Tag.SEED, self.params.get(Param.SEED, "?"))

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    def component(self, family: str) -> str:
        return self.tags.get(family) or self.params.get(Param.component(family), "?")


@dataclass
class Study:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None  # newest run tagged sweep=true
    trials: list[Trial]
    parent_tags: dict[str, str] = field(default_factory=dict)


def _search_all(client, experiment_id: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_study(
    client, name: str, tracking_uri: str, curve_keys: Sequence[str] = (Metric.VAL_LOSS, Metric.TRAIN_TOKENS_SEEN)
) -> Study:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise StudyError(
            f"no MLflow experiment named '{name}' in {tracking_uri}; experiments there: {', '.join(names) or '(none)'}"
        )
    parent, parent_tags, trials = None, {}, []
    for r in _search_all(client, exp.experiment_id):  # newest first
        tags = dict(r.data.tags)
        if tags.get(Tag.SWEEP) == TRUE:
            if parent is None:
                parent, parent_tags = r.info.run_id, tags
            continue
        if tags.get(Tag.REPORT) == TRUE:  # a run this module created to hold a report
            continue
        end, start = r.info.end_time, r.info.start_time
        t = Trial(
            r.info.run_id,
            r.info.status,
            tags,
            dict(r.data.params),
            dict(r.data.metrics),
            (end - start) / 1000.0 if end and start else None,
        )
        if t.status in ("FINISHED", "KILLED"):
            for key in curve_keys:
                hist = sorted(client.get_metric_history(t.run_id, key), key=lambda m: m.step)
                if hist:
                    t.curves[key] = (
                        np.array([m.step for m in hist], dtype=float),
                        np.array([m.value for m in hist], dtype=float),
                    )
        trials.append(t)
    return Study(name, tracking_uri, exp.experiment_id, parent, trials[::-1], parent_tags)


# ---------------------------------------------------------------------------------------------
# Configurations: seeds pooled


def is_run_specific(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] in RUN_SPECIFIC_LEAVES or parts[0] in RUN_SPECIFIC_ROOTS


@dataclass
class Configuration:
    id: str  # C1, C2, ... in order of mean final val loss
    levels: dict[str, str]  # family -> level label; extra factor (dotted param) -> value
    trials: list[Trial]

    @property
    def label(self) -> str:
        return f"{self.id} " + " · ".join(self.levels.values())

    @property
    def arch(self) -> tuple[str, ...]:
        return tuple(self.levels[f] for f in FAMILIES)

    def values(self, key: str) -> np.ndarray:
        return np.array([t.metrics[key] for t in self.trials if key in t.metrics], dtype=float)

    def stat(self, key: str) -> tuple[float, float, int]:
        """(mean, sample std with ddof=1, n) over the seeds that logged `key`."""
        v = self.values(key)
        if len(v) == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)

    def wall(self) -> tuple[float, float, int]:
        v = np.array([t.wall_s for t in self.trials if t.wall_s is not None], dtype=float)
        if len(v) == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _varying(trials: Sequence[Trial], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if len({t.params[k] for t in trials if k in t.params}) > 1]


def level_labels(trials: Sequence[Trial]) -> dict[str, dict[str, str]]:
    """run id -> family -> label. The label is the registry name, plus the component's own
    params that vary between trials of that name independently of everything else
    (gqa(n_kv_heads=1) vs gqa(n_kv_heads=2); not a table size that follows context_length)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for f in FAMILIES:
        mine = f"model.{f}."
        by_name: dict[str, list[Trial]] = defaultdict(list)
        for t in trials:
            by_name[t.component(f)].append(t)
        for name, group in by_name.items():
            sub = sorted({k for t in group for k in t.params if k.startswith(mine)} - {mine + "name"})
            outer = sorted({k for t in group for k in t.params if not k.startswith(mine) and not is_run_specific(k)})
            context = {t.run_id: tuple(t.params.get(k) for k in outer) for t in group}
            labelled = [
                k
                for k in _varying(group, sub)
                if len({(context[t.run_id], t.params.get(k)) for t in group}) > len(set(context.values()))
            ]
            for t in group:
                extra = ",".join(f"{k[len(mine) :]}={t.params.get(k, '-')}" for k in labelled)
                out[t.run_id][f] = f"{name}({extra})" if extra else name
    return out


def configuration_key(t: Trial) -> tuple:
    """What makes two runs the same configuration: every param but the run-specific ones."""
    return tuple(sorted((k, v) for k, v in t.params.items() if not is_run_specific(k)))


@dataclass
class Selection:
    """The finished runs a report analyses, and those it sets aside (and why)."""

    used: list[Trial]  # one per (configuration, seed): the newest
    superseded: list[Trial]  # older runs of a (configuration, seed) that `used` holds
    reruns: list[Trial]  # tagged rerun_of: checks of another run, not replicates
    commits: Counter  # git_commit -> runs used

    def rerun_checks(self) -> list[tuple[Trial, Trial | None, float]]:
        """(rerun, its original when present, |delta final val loss|)."""
        by_id = {t.run_id: t for t in [*self.used, *self.superseded]}
        out = []
        for r in self.reruns:
            orig = by_id.get(r.tags.get("rerun_of", ""))
            a, b = r.metrics.get("val/loss", math.nan), orig.metrics.get("val/loss", math.nan) if orig else math.nan
            out.append((r, orig, abs(a - b)))
        return out


def select_replicates(trials: Sequence[Trial]) -> Selection:
    """Finished runs deduplicated on (configuration, seed), newest wins; reruns set aside.
    `trials` are oldest first (as load_study returns them)."""
    done = [t for t in trials if t.status == "FINISHED"]
    reruns = [t for t in done if t.tags.get("rerun_of")]
    newest: dict[tuple, Trial] = {}
    superseded = []
    for t in done:
        if t.tags.get("rerun_of"):
            continue
        key = (configuration_key(t), t.seed)
        if key in newest:
            superseded.append(newest[key])
        newest[key] = t
    used = list(newest.values())
    return Selection(used, superseded, reruns, Counter(t.tags.get("git_commit", "?") for t in used))


def group_configurations(trials: Sequence[Trial]) -> tuple[list[Configuration], list[str]]:
    """Finished trials grouped by configuration; also the extra (non-component) params that
    vary between configurations, e.g. model.d_model in a scaling study. Pass the runs of
    `select_replicates(...).used` so each seed counts once."""
    done = [t for t in trials if t.status == "FINISHED"]
    labels = level_labels(done)
    keys = sorted({k for t in done for k in t.params if not is_run_specific(k)})
    in_component = tuple(f"model.{f}." for f in FAMILIES)
    extra = [k for k in _varying(done, keys) if not k.startswith(in_component)]
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for t in done:
        key = tuple(labels[t.run_id][f] for f in FAMILIES) + tuple((k, t.params.get(k)) for k in keys)
        groups[key].append(t)
    configs = []
    for group in groups.values():
        t0 = group[0]
        levels = {f: labels[t0.run_id][f] for f in FAMILIES}
        levels.update({k: t0.params.get(k, "-") for k in extra})
        configs.append(Configuration("", levels, sorted(group, key=lambda t: t.seed)))
    configs.sort(key=lambda c: (math.isnan(c.stat(Metric.VAL_LOSS)[0]), c.stat(Metric.VAL_LOSS)[0]))
    for i, c in enumerate(configs, 1):
        c.id = f"C{i}"
    return configs, extra


def level_order(family: str, levels: Sequence[str]) -> list[str]:
    """Levels of a factor: a family's GPT-2 level first, then by name; numeric factors by value."""
    if family in BASELINE:
        return sorted(levels, key=lambda lvl: (lvl.split("(")[0] != BASELINE[family], lvl))
    try:  # numbers (a grouped factor sorts on its first param)
        return sorted(levels, key=lambda lvl: float(lvl.split(" / ")[0]))
    except ValueError:
        return sorted(levels)


def level_of(c: Configuration, factor: str) -> str:
    """A configuration's level of a factor; a grouped factor joins its params' values."""
    return c.levels[factor] if factor in c.levels else " / ".join(c.levels[k] for k in factor.split(" / "))


def group_extra(configs: Sequence[Configuration], extra: Sequence[str]) -> list[str]:
    """Extra params that determine each other one-to-one form one factor (a size preset sets
    d_model, n_layers, n_heads and context_length together): 'model.d_model / model.n_layers'."""
    groups: list[list[str]] = []
    for k in extra:
        for g in groups:
            pairs = {(tuple(c.levels[x] for x in g), c.levels[k]) for c in configs}
            if len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}):
                g.append(k)
                break
        else:
            groups.append([k])
    return [" / ".join(g) for g in groups]


def factors_and_levels(
    configs: Sequence[Configuration], extra: Sequence[str], reference: dict[str, str]
) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Factors = families and (grouped) extra params with 2+ levels; extra params that follow
    from the components (a preset's bias flag) are columns, not factors."""
    candidates = [*FAMILIES, *group_extra(configs, extra)]
    levels = {f: level_order(f, list({level_of(c, f) for c in configs})) for f in candidates}

    def follows_components(f: str) -> bool:
        by_arch: dict[tuple, set] = defaultdict(set)
        for c in configs:
            by_arch[c.arch].add(level_of(c, f))
        return all(len(v) == 1 for v in by_arch.values())

    def sampled(f: str) -> bool:  # a hyperparameter a sampler drew (tune_lr): a column, not a factor
        return f not in FAMILIES and len(levels[f]) > MAX_GRID_LEVELS

    factors = [
        f for f in candidates if len(levels[f]) > 1 and (f in FAMILIES or not (follows_components(f) or sampled(f)))
    ]
    # A factor that is not a component family defaults to the level the GPT-2 baseline
    # configurations share, when they share one (gpt_to_llama: gpt2's bias and tied head; not
    # a size, which they span), else to its first level.
    base = [c for c in configs if all(c.levels[f].split("(")[0] == BASELINE[f] for f in FAMILIES)]

    def base_level(f: str) -> str | None:
        shared = {level_of(c, f) for c in base}
        return shared.pop() if len(shared) == 1 else None

    ref = {}
    for f in factors:
        want = reference.get(f, BASELINE.get(f) or base_level(f))
        matches = [lvl for lvl in levels[f] if lvl == want or lvl.split("(")[0] == want]
        if f in reference and not matches:
            raise StudyError(
                f"--reference {f}={reference[f]}: not a level of this study; valid: {', '.join(levels[f])}"
            )
        ref[f] = matches[0] if matches else levels[f][0]
    return factors, levels, ref


def factorial(
    configs: Sequence[Configuration],
    factors: Sequence[str],
    levels: dict[str, list[str]],
    ref: dict[str, str],
    key: str,
    transform=lambda v: v,
    value_of=None,
) -> Factorial:
    """The study's factorial of `key` (or of `value_of(trial)`): one value per cell and seed.
    Two configurations in one cell (a param that is neither a factor nor follows the
    components) are averaged per seed."""
    per: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in configs:
        cell = tuple(level_of(c, f) for f in factors)
        for t in c.trials:
            v = value_of(t) if value_of else t.metrics.get(key, math.nan)
            if v is not None and math.isfinite(v):
                per[cell][t.seed].append(float(transform(np.asarray(v))))
    cells = {cell: {s: float(np.mean(v)) for s, v in seeds.items()} for cell, seeds in per.items()}
    return Factorial.from_cells(factors, cells, {f: levels[f] for f in factors}, ref)
