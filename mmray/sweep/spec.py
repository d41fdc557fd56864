"""The ``sweep:`` section of a sweep config, parsed and validated before Ray starts.

A sweep config is a training config (``data``, ``model``, ``train``, ``eval``, ``run``, ``budget``: the base of every
trial) plus one more top-level section, ``sweep:``, read here and never passed to :mod:`mmray.config`::

    sweep:
      metric: val_vqa_acc_compositional   # what the search maximises (mode: max) or minimises (mode: min)
      search: random                      # random | grid | optuna (Optuna's TPE through Ray Tune)
      num_samples: 2                      # random: samples per grid point; optuna: trials; grid: repeats
      max_concurrent: 2
      space:                              # the same dotted keys as the CLI overrides
        model.fusion: {grid: [late, early, hierarchical, attention]}
        train.lr: {loguniform: [3.0e-4, 3.0e-3]}
      scheduler: {name: asha, grace_period: 50, reduction_factor: 2}
      budget: {usd: 20, gpu_hours: 0, instance_type: local}

Every problem is a :class:`~mmray.config.ConfigError` that names the key (``sweep.space.train.lr``, ...). Every value
of the space is checked against the base config: each grid/choice value and both bounds of each range must make a
valid training config on their own, so a typo such as ``model.fusion: {grid: [atention]}`` fails here, not in a
trial an hour later. Combinations are checked by the trials themselves (a failing trial is recorded, see
:mod:`mmray.sweep.runner`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from mmray import config as config_lib
from mmray.config import Config, ConfigError
from mmray.eval import names

# Search-space kinds -> how many arguments (None: a non-empty list of values).
KINDS: dict[str, int | None] = {"grid": None, "choice": None, "uniform": 2, "loguniform": 2, "quniform": 3,
                                "qloguniform": 3, "randint": 2, "lograndint": 2}
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "pbt", "fifo")
MODES = ("max", "min")
# Keys a sweep owns or holds fixed: every trial has its own run directory, and the resources of a trial (what the
# budget prices and what max_concurrent multiplies) are the same for every trial.
FIXED_KEYS = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu")
FIXED_SECTIONS = ("run", "budget")
# What PBT may change in a running trial, whose next generation resumes from another trial's checkpoint: keys that
# leave the parameters' shapes alone and that the checkpoint does not restore over the new value.
PBT_MUTABLE = ("train.lr", "train.grad_clip", "model.dropout")


def _nearest(name: str, options) -> str:
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` (a KINDS name) with its ``args`` (values, or bounds [and quantum])."""

    key: str
    kind: str
    args: tuple

    @property
    def enumerated(self) -> bool:
        return self.kind in ("grid", "choice")

    def to_tune(self, as_grid: bool = False):
        """The Ray Tune domain (``as_grid``: a choice becomes a grid, for search: grid)."""
        from ray import tune

        if self.kind == "grid" or (as_grid and self.kind == "choice"):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform,
                "quniform": tune.quniform, "qloguniform": tune.qloguniform, "randint": tune.randint,
                "lograndint": tune.lograndint}[self.kind](*self.args)

    def to_yaml(self) -> dict:
        return {self.kind: list(self.args)}


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping (ASHA), population-based training (PBT) or none (FIFO); times are optimizer steps."""

    name: str = "asha"
    grace_period: int = 0  # ASHA: steps before a trial can be stopped; 0 means eval.every
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 0  # PBT: steps between exploit/explore; 0 means train.checkpoint_every
    mutations: tuple[str, ...] = ()  # PBT: space keys it perturbs; empty means every PBT_MUTABLE key of the space


@dataclass(frozen=True)
class BudgetSpec:
    """The sweep's cap and how a trial is priced (see mmray.sweep.budget for the arithmetic)."""

    usd: float = 0.0  # 0: no dollar cap
    gpu_hours: float = 0.0  # 0: no GPU-hour cap
    instance_type: str = "local"  # the price-table entry the trials run on (budget.prices / $MMRAY_PRICES)
    market: str = "on-demand"
    safety: float = 1.25  # projected durations are multiplied by this
    stop_reserve_s: float = 30.0  # what stopping a running trial takes (checkpoint, teardown), kept in reserve
    step_s: float = 0.0  # first estimate of seconds per step before a trial has measured it; 0: unknown
    startup_s: float = 60.0  # first estimate of seconds from a trial's start to its first step


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the search and the base training config every trial derives from."""

    metric: str
    mode: str
    search: str
    num_samples: int
    max_concurrent: int
    seed: int
    space: tuple[Dimension, ...]
    points: tuple[dict, ...]
    scheduler: SchedulerSpec
    budget: BudgetSpec
    name: str
    storage_path: str
    base: dict = field(repr=False)  # the training sections as given (YAML shaped, CLI overrides merged)
    config: Config = field(repr=False)  # the base, validated

    @property
    def sweep_dir(self) -> str:
        from mmray import storage

        root = self.storage_path if storage.is_s3(self.storage_path) else os.path.expanduser(self.storage_path)
        return storage.join(root, self.name)

    @property
    def keys(self) -> list[str]:
        """Every key a trial's parameters may set: the space's, then those only sweep.points set."""
        keys = [d.key for d in self.space]
        for point in self.points:
            keys += [k for k in point if k not in keys]
        return keys

    def trial_config(self, params: Mapping[str, Any]) -> Config:
        """The training config of one trial: the base with ``params`` (dotted keys, e.g. from the search) set."""
        return config_lib.from_dict(with_values(self.base, params))

    def best_config_yaml(self, params: Mapping[str, Any], header: str = "") -> str:
        """A training config that `mmray train --config` accepts as is: the base with ``params``, no sweep section.

        The run section is the base's (the trial's own run name is dropped), so training it starts a fresh run.
        """
        raw = with_values(self.base, params)
        self.trial_config(params)  # validated, so the file written is one that loads
        return header + yaml.safe_dump(raw, sort_keys=False)

    def to_dict(self) -> dict:
        """The sweep section, normalised (what sweep.yaml records next to the results)."""
        out = {k: getattr(self, k) for k in ("metric", "mode", "search", "num_samples", "max_concurrent", "seed",
                                            "name", "storage_path")}
        out["space"] = {d.key: d.to_yaml() for d in self.space}
        out["points"] = [dict(p) for p in self.points]
        out["scheduler"] = {**dataclasses.asdict(self.scheduler),
                            "mutations": list(self.scheduler.mutations)}
        out["budget"] = dataclasses.asdict(self.budget)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump({**self.base, "sweep": self.to_dict()}, sort_keys=False)

    def resources_per_trial(self, gpus_available: bool) -> dict[str, float]:
        """What one trial's Ray Train workers reserve: what the budget prices it by."""
        t = self.config.train
        use_gpu = t.use_gpu == "true" or (t.use_gpu == "auto" and gpus_available)
        return {"CPU": t.num_workers * t.cpus_per_worker, "GPU": float(t.num_workers if use_gpu else 0)}


# ---------------------------------------------------------------------------------------------------------- helpers

def with_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A deep copy of the YAML-shaped ``base`` with dotted ``values`` (``{'train.lr': 1e-3}``) set in it."""
    raw = copy.deepcopy(dict(base))
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][name] = value
    return raw


def _check_value(base: dict, key: str, value: Any, where: str) -> None:
    """A value of the space must make a valid training config on its own; the error names where it came from."""
    try:
        config_lib.from_dict(with_values(base, {key: value}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {value!r} does not make a valid training config: {e}") from None


def _field_type(key: str) -> type:
    return config_lib.field_type(*key.split(".", 1))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
    return value


def _dimension(key: Any, raw: Any, base: dict) -> Dimension:
    where = f"sweep.space.{key}"
    keys = config_lib.all_keys()
    if not isinstance(key, str) or key not in keys:
        raise ConfigError(f"{where}: not a config key; the space takes the dotted keys of `mmray config` "
                          "(e.g. model.fusion, train.lr)." + _nearest(key, keys))
    if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
        raise ConfigError(f"{where}: cannot be searched: every trial has its own run directory (run.*), the sweep "
                          "has one budget (sweep.budget), and the resources of a trial (train.num_workers, "
                          "train.cpus_per_worker, train.use_gpu) are the same for every trial; set it in the "
                          "training sections instead.")
    kinds = ", ".join(f"{{{k}: [...]}}" for k in KINDS)
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ConfigError(f"{where}: expected one of {kinds}, got {raw!r}.")
    (kind, args), = raw.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(KINDS)}." + _nearest(kind, KINDS))
    where = f"{where}.{kind}"
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: expected a non-empty list, got {args!r}.")
    arity = KINDS[kind]
    if arity is None:
        for value in args:
            _check_value(base, key, value, where)
        if len({json.dumps(v, sort_keys=True, default=str) for v in args}) != len(args):
            raise ConfigError(f"{where}: values repeat: {list(args)!r}.")
        return Dimension(key, kind, tuple(args))
    if len(args) != arity:
        shape = "[low, high]" if arity == 2 else "[low, high, q]"
        raise ConfigError(f"{where}: expected {shape}, got {list(args)!r}.")
    low, high = (_number(a, where) for a in args[:2])
    typ = _field_type(key)
    if typ not in (int, float):
        raise ConfigError(f"{where}: {key} is a {typ.__name__}; search it with grid or choice.")
    if kind in ("randint", "lograndint"):
        if not all(float(a).is_integer() for a in args):
            raise ConfigError(f"{where}: bounds must be integers, got {list(args)!r}.")
        low, high = int(low), int(high)
    elif typ is int and kind in ("uniform", "loguniform"):
        raise ConfigError(f"{where}: {key} is an integer; use randint, lograndint, quniform or qloguniform "
                          "(with an integer q), grid or choice.")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high}).")
    if kind.startswith("log") or kind == "qloguniform":
        if low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}.")
    q = None
    if arity == 3:
        q = _number(args[2], where)
        if q <= 0:
            raise ConfigError(f"{where}: the quantum q must be > 0, got {q}.")
        if typ is int and not (float(q).is_integer() and float(low).is_integer()):
            raise ConfigError(f"{where}: {key} is an integer, so low and q must be integers.")
    # randint's high is exclusive (as in Ray Tune); the largest value it draws must be valid too
    top = high - 1 if kind in ("randint", "lograndint") else high
    for value in (low, top):
        _check_value(base, key, int(value) if typ is int else value, where)
    return Dimension(key, kind, (low, high) if q is None else (low, high, q))


def _typed(section: str, raw: Any, cls: type, extra_check=None) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw`` (section ``sweep.<section>``), with typed values."""
    where = f"sweep.{section}" if section else "sweep"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in fields:
            raise ConfigError(f"unknown key {where}.{name}; allowed keys in {where}: {', '.join(fields)}."
                              + _nearest(name, fields))
        default = fields[name].default
        key = f"{where}.{name}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}.")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}.")
            value = int(value)
        elif isinstance(default, float):
            value = float(_number(value, key))
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string, got {value!r}.")
        elif isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}: expected a list of keys, got {value!r}.")
            value = tuple(value)
        values[name] = value
    return cls(**values)


_TOP = {"metric", "mode", "search", "num_samples", "max_concurrent", "seed", "space", "points", "scheduler",
        "budget", "name", "storage_path"}


def parse(sweep: Any, base: Mapping[str, Any]) -> SweepSpec:
    """Validate the ``sweep:`` section against the training sections ``base`` (YAML shaped)."""
    base = copy.deepcopy(dict(base))
    cfg = config_lib.from_dict(base)
    if not isinstance(sweep, Mapping):
        raise ConfigError(f"the sweep: section must be a mapping, got {sweep!r}.")
    for key in sweep:
        if key not in _TOP:
            raise ConfigError(f"unknown key sweep.{key}; allowed keys in sweep: {', '.join(sorted(_TOP))}."
                              + _nearest(key, _TOP))
    metric = sweep.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("sweep.metric is required: the reported metric to optimise, e.g. "
                          "val_vqa_acc_compositional, val_i2t_r@1, val_itm_acc or loss.")
    if not (metric.startswith("val_") or metric == "loss"):
        raise ConfigError(f"sweep.metric: {metric!r} is not a metric the trials report during training; use a "
                          "held-out metric (val_*, reported every eval.every steps) or the training loss ('loss').")
    if metric != "loss" and not names.known(metric[4:]):
        raise ConfigError(names.unknown_message("sweep.metric", metric))
    mode = sweep.get("mode", "min" if "loss" in metric else "max")
    if mode not in MODES:
        raise ConfigError(f"sweep.mode: {mode!r} is not allowed; allowed values: {', '.join(MODES)}.")
    search = sweep.get("search", "random")
    if search not in SEARCHES:
        raise ConfigError(f"sweep.search: {search!r} is not allowed; allowed values: {', '.join(SEARCHES)}."
                          + _nearest(search, SEARCHES))
    ints = {}
    for name, default, low in (("num_samples", 1, 1), ("max_concurrent", 1, 1), ("seed", 0, None)):
        value = sweep.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"sweep.{name}: expected an integer" + (f" >= {low}" if low is not None else "")
                              + f", got {value!r}.")
        ints[name] = value

    space_raw = sweep.get("space") or {}
    if not isinstance(space_raw, Mapping) or not space_raw:
        raise ConfigError("sweep.space is required: a mapping of dotted config keys to a kind, e.g. "
                          "'model.fusion: {grid: [late, attention]}' or 'train.lr: {loguniform: [1e-4, 1e-2]}'.")
    space = tuple(_dimension(k, v, base) for k, v in space_raw.items())
    if search == "grid":
        for d in space:
            if not d.enumerated:
                raise ConfigError(f"sweep.space.{d.key}: search: grid enumerates every value, so each key needs "
                                  f"grid or choice, not {d.kind}; use search: random or optuna to sample ranges.")
    if search == "optuna":
        for d in space:
            if d.kind == "grid":
                raise ConfigError(f"sweep.space.{d.key}: Optuna samples the space and cannot enumerate a grid; use "
                                  "choice, or search: random / grid.")
        _require_optuna()

    points_raw = sweep.get("points") or []
    if not isinstance(points_raw, list):
        raise ConfigError(f"sweep.points must be a list of mappings of dotted keys to values, got {points_raw!r}.")
    points = []
    for i, point in enumerate(points_raw):
        where = f"sweep.points[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(f"{where} must be a non-empty mapping of dotted keys to values, got {point!r}.")
        for key in point:
            if not isinstance(key, str) or key not in config_lib.all_keys():
                raise ConfigError(f"{where}: {key!r} is not a config key." + _nearest(key, config_lib.all_keys()))
            if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
                raise ConfigError(f"{where}: {key} cannot be set per trial (see sweep.space).")
        try:
            config_lib.from_dict(with_values(base, point))
        except ConfigError as e:
            raise ConfigError(f"{where} does not make a valid training config: {e}") from None
        grid_keys = {d.key for d in space if d.kind == "grid" or (search == "grid" and d.enumerated)}
        if grid_keys - set(point):
            raise ConfigError(f"{where}: a point is one trial, so it sets every grid key too; missing: "
                              f"{', '.join(sorted(grid_keys - set(point)))}.")
        if search == "optuna" and set(point) - {d.key for d in space}:
            raise ConfigError(f"{where}: Optuna evaluates points of its space only; keys outside sweep.space: "
                              f"{', '.join(sorted(set(point) - {d.key for d in space}))}.")
        points.append(dict(point))

    _check_metric_reported(metric, base, space, points)
    scheduler = _typed("scheduler", sweep.get("scheduler"), SchedulerSpec)
    scheduler = _check_scheduler(scheduler, cfg, metric, space)
    budget = _typed("budget", sweep.get("budget"), BudgetSpec)
    if cfg.budget.usd:
        # budget.usd caps a run; a sweep is one run for the budget: its cap is the sweep's (trials are not capped
        # one by one, since each trial's own meter prices the whole cluster, the other trials included).
        if budget.usd and budget.usd != cfg.budget.usd:
            raise ConfigError(f"budget.usd={cfg.budget.usd:g} and sweep.budget.usd={budget.usd:g} disagree: in a "
                              "sweep, budget.usd is the cap of the whole sweep; set one of them.")
        budget = dataclasses.replace(budget, usd=cfg.budget.usd)
        base.setdefault("budget", {})["usd"] = 0.0
        cfg = config_lib.from_dict(base)
    _check_budget(budget, cfg)

    name = sweep.get("name", "")
    storage_path = sweep.get("storage_path", "")
    for key, value in (("name", name), ("storage_path", storage_path)):
        if not isinstance(value, str):
            raise ConfigError(f"sweep.{key}: expected a string, got {value!r}.")
    if name and ("/" in name or name in (".", "..")):
        raise ConfigError(f"sweep.name: {name!r} must be a plain directory name (no '/').")
    spec = SweepSpec(metric=metric, mode=mode, search=search, space=space, points=tuple(points),
                     scheduler=scheduler, budget=budget, name=name, storage_path=storage_path or cfg.run.storage_path,
                     base=base, config=cfg, **ints)
    return dataclasses.replace(spec, name=name or f"sweep-{fingerprint(spec)}")


# Held-out metrics by the objective whose outputs compute them (mmray.eval.evaluate); others need none.
METRIC_OBJECTIVES = (("val_vqa_", "vqa"), ("val_caption_", "caption"), ("val_bleu4", "caption"),
                     ("val_cider_d", "caption"), ("val_i2t_", "contrastive"), ("val_t2i_", "contrastive"),
                     ("val_zero_shot", "contrastive"), ("val_itm_", "itm"))
OBJECTIVE_KEYS = ("model.fusion", "model.decoder_depth", "model.preset", "model.contrastive_weight",
                  "model.itm_weight", "model.caption_weight", "model.vqa_weight")


def _check_metric_reported(metric: str, base: dict, space: tuple[Dimension, ...], points: list[dict]) -> None:
    """ConfigError when no trial could report ``metric``: it needs an objective (VQA, captioning, contrastive, ITM)
    that neither the base config nor any value the space or the points give the objective keys trains (every trial
    would run to its end and fail). Skipped when a range decides an objective key (its values are not listed)."""
    from mmray.models.objectives import objective_weights

    needed = next((objective for prefix, objective in METRIC_OBJECTIVES if metric.startswith(prefix)), None)
    dims = [d for d in space if d.key in OBJECTIVE_KEYS]
    if needed is None or not all(d.enumerated for d in dims):
        return
    trials = [dict(zip([d.key for d in dims], values)) for values in itertools.product(*(d.args for d in dims))]
    trials += [{k: v for k, v in p.items() if k in OBJECTIVE_KEYS} for p in points]
    for values in trials:
        try:
            if needed in objective_weights(config_lib.from_dict(with_values(base, values)).model):
                return
        except ConfigError:
            continue  # a combination that is not a valid config: its trial fails anyway
    raise ConfigError(f"sweep.metric: {metric!r} is computed from the {needed} objective, which no trial of this "
                      f"sweep trains (model.fusion, model.decoder_depth and model.{needed}_weight decide it; see "
                      "`mmray config`); choose a metric the trials report, or train that objective.")


def _check_scheduler(s: SchedulerSpec, cfg: Config, metric: str, space: tuple[Dimension, ...]) -> SchedulerSpec:
    if s.name not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler.name: {s.name!r} is not allowed; allowed values: "
                          f"{', '.join(SCHEDULERS)}." + _nearest(s.name, SCHEDULERS))
    if s.name == "fifo":
        return s
    # A scheduler decides on intermediate results, which only periodic evaluation (val_*) or logging (loss) gives.
    every = cfg.train.log_every if metric == "loss" else cfg.eval.every
    if every <= 0:
        raise ConfigError(f"sweep.scheduler.name={s.name} decides on intermediate results of {metric}, but "
                          f"eval.every is 0 (evaluation only at the end): set eval.every to a number of steps, or "
                          "use sweep.scheduler.name=fifo.")
    if s.name == "asha":
        grace = s.grace_period or every
        if grace < 1 or grace > cfg.train.max_steps:
            raise ConfigError(f"sweep.scheduler.grace_period: {grace} must be between 1 and train.max_steps "
                              f"({cfg.train.max_steps}).")
        if s.reduction_factor <= 1:
            raise ConfigError(f"sweep.scheduler.reduction_factor must be > 1, got {s.reduction_factor}.")
        return dataclasses.replace(s, grace_period=grace)
    interval = s.perturbation_interval or cfg.train.checkpoint_every
    if interval % cfg.train.checkpoint_every or interval % every:
        raise ConfigError(f"sweep.scheduler.perturbation_interval ({interval}) must be a multiple of "
                          f"train.checkpoint_every ({cfg.train.checkpoint_every}) and of eval.every ({every}): PBT "
                          "copies a trial's checkpoint when it exploits, and compares metrics reported at that step.")
    keys = {d.key for d in space}
    mutations = s.mutations or tuple(k for k in PBT_MUTABLE if k in keys)
    for key in mutations:
        if key not in keys:
            raise ConfigError(f"sweep.scheduler.mutations: {key!r} is not a key of sweep.space.")
        if key not in PBT_MUTABLE:
            raise ConfigError(f"sweep.scheduler.mutations: {key} cannot change in a running trial (its next "
                              f"generation resumes from a checkpoint); PBT can perturb: {', '.join(PBT_MUTABLE)}.")
    if not mutations:
        raise ConfigError(f"sweep.scheduler.name=pbt needs a key of sweep.space it can perturb: one of "
                          f"{', '.join(PBT_MUTABLE)}.")
    return dataclasses.replace(s, perturbation_interval=interval, mutations=tuple(mutations))


def _check_budget(b: BudgetSpec, cfg: Config) -> None:
    from mmray.cost import prices

    for name in ("usd", "gpu_hours", "stop_reserve_s", "step_s", "startup_s"):
        if getattr(b, name) < 0:
            raise ConfigError(f"sweep.budget.{name} must be >= 0, got {getattr(b, name)}.")
    if b.safety < 1:
        raise ConfigError(f"sweep.budget.safety must be >= 1 (it only lengthens estimates), got {b.safety}.")
    if b.market not in prices.MARKETS:
        raise ConfigError(f"sweep.budget.market: {b.market!r} is not allowed; allowed values: "
                          f"{', '.join(prices.MARKETS)}.")
    table = prices.load(cfg.budget.prices)  # a bad price table is bad input too (PriceError is a ConfigError)
    if b.instance_type not in table.instances:
        raise ConfigError(f"sweep.budget.instance_type: {b.instance_type!r} is not in the price table "
                          f"({table.path}); known: {', '.join(table.instances)}."
                          + _nearest(b.instance_type, table.instances))


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("sweep.search: optuna needs the optuna package (pip install optuna); or use search: "
                          "random / grid.") from None


def fingerprint(spec: SweepSpec) -> str:
    """A short hash of what the sweep searches (not its budget, concurrency or where it is stored)."""
    d = spec.to_dict()
    for key in ("budget", "max_concurrent", "name", "storage_path"):
        d.pop(key)
    return hashlib.sha256(json.dumps([spec.base, d], sort_keys=True, default=str).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------------------- loading

_TEXT_KEYS = ("name", "storage_path", "metric", "budget.instance_type", "budget.market")  # sweep.name=007: "007"


def split_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """Dotted overrides -> (training overrides, the sweep section's overrides as a nested mapping).

    ``sweep.num_samples=4`` and ``sweep.budget.usd=2.5`` set keys of the sweep section; everything else goes to the
    training config. The space and the points are edited in the file.
    """
    train, sweep = [], {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key.startswith("sweep."):
            train.append(item)
            continue
        if not _:
            raise ConfigError(f"override {item!r} must look like sweep.key=value (e.g. sweep.num_samples=4).")
        parts = key.split(".")[1:]
        if not all(parts) or parts[0] in ("space", "points"):
            raise ConfigError(f"override {key!r}: sweep.space and sweep.points are edited in the config file; "
                              "overrides set sweep.KEY or sweep.SECTION.KEY (e.g. sweep.budget.usd=5).")
        if len(parts) > 2:
            raise ConfigError(f"override {key!r} must be sweep.KEY or sweep.SECTION.KEY.")
        value = config_lib.parse_value(raw, text=".".join(parts) in _TEXT_KEYS)
        node = sweep
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return train, sweep


def _merge_nested(base: dict, extra: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge_nested(dict(out[key]), value)
        else:
            out[key] = value
    return out


def from_mapping(raw: Mapping[str, Any], overrides: list[str] | None = None) -> SweepSpec:
    """A sweep from a YAML-shaped mapping (training sections plus ``sweep``) and dotted overrides."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a sweep config must be a mapping of sections, got {type(raw).__name__}.")
    raw = copy.deepcopy(dict(raw))
    if "sweep" not in raw:
        raise ConfigError("the config has no sweep: section (the search space, metric and budget); see "
                          "jobs/configs/sweep-fusion.yaml for an example.")
    sweep = raw.pop("sweep")
    train_overrides, sweep_overrides = split_overrides(overrides or [])
    if sweep_overrides:
        if not isinstance(sweep, Mapping):
            raise ConfigError(f"the sweep: section must be a mapping, got {sweep!r}.")
        sweep = _merge_nested(dict(sweep), sweep_overrides)
    for section, values in raw.items():
        if not isinstance(values, Mapping):  # from_dict names the section; keep its message for non-mappings too
            config_lib.from_dict({section: values})
    base = {k: dict(v) for k, v in raw.items()}
    for section, values in config_lib.parse_overrides(train_overrides).items():
        base.setdefault(section, {}).update(values)
    return parse(sweep, base)


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep config file (local or s3://) and apply dotted overrides. Raises ConfigError on anything wrong."""
    from mmray import storage

    try:
        text = storage.read_text(str(path))
    except (FileNotFoundError, storage.StorageError):
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise config_lib.file_error(path, e) from None
    # `name: 010` is "010", as on the command line
    return from_mapping(config_lib.parse_sections(text, path, {"sweep": _TEXT_KEYS}), overrides)
