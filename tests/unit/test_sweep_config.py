"""The sweep section: parsing and the errors a user sees, the search space, the Pareto frontier and the budget
arithmetic (no Ray cluster)."""
from pathlib import Path

import pytest
import yaml

from mmray import config
from mmray.config import ConfigError
from mmray.cost import prices
from mmray.sweep import report, spec
from mmray.sweep.budget import Ledger, Limits, TrialPrice, estimate, price_trial, projected_seconds

REPO = Path(__file__).resolve().parents[2]
SWEEP_CONFIGS = sorted(p for p in (REPO / "jobs" / "configs").glob("*.yaml") if "sweep" in yaml.safe_load(p.read_text()))

BASE = {"model": {"decoder_depth": 1, "vqa_weight": 1}, "train": {"max_steps": 20, "warmup_steps": 2},
        "eval": {"every": 5}}


def _sweep(**sweep):
    return {**BASE, "sweep": {"metric": "val_vqa_acc", "space": {"model.fusion": {"grid": ["late", "early"]}},
                              **sweep}}


def test_parses_space_search_scheduler_and_budget():
    s = spec.from_mapping(_sweep(space={"model.fusion": {"grid": ["late", "attention"]},
                                        "train.lr": {"loguniform": [1e-4, 1e-2]},
                                        "train.micro_batch_size": {"choice": [16, 32]},
                                        "train.weight_decay": {"quniform": [0.0, 0.2, 0.05]},
                                        "train.seed": {"randint": [0, 10]}},
                                 budget={"usd": 2, "instance_type": "g5.xlarge", "market": "spot"}),
                          ["sweep.num_samples=3", "sweep.budget.gpu_hours=1.5", "train.lr=0.003"])
    assert (s.metric, s.mode, s.search, s.num_samples, s.max_concurrent) == ("val_vqa_acc", "max", "random", 3, 1)
    assert [d.key for d in s.space] == ["model.fusion", "train.lr", "train.micro_batch_size", "train.weight_decay",
                                        "train.seed"]
    assert s.space[1] == spec.Dimension("train.lr", "loguniform", (1e-4, 1e-2))
    assert s.scheduler.name == "asha" and s.scheduler.grace_period == 5  # defaults to eval.every
    assert (s.budget.usd, s.budget.gpu_hours, s.budget.instance_type, s.budget.market) == (2, 1.5, "g5.xlarge", "spot")
    assert s.config.train.lr == pytest.approx(3e-3)  # the training override reaches the base
    assert s.name.startswith("sweep-") and s.sweep_dir.endswith(s.name)
    trial = s.trial_config({"model.fusion": "attention", "train.lr": 5e-4, "run.name": "t1"})
    assert (trial.model.fusion, trial.train.lr, trial.run.name) == ("attention", 5e-4, "t1")


def test_name_follows_what_is_searched_not_budget_or_concurrency():
    a = spec.from_mapping(_sweep())
    assert spec.from_mapping(_sweep(budget={"usd": 9}, max_concurrent=3)).name == a.name
    assert spec.from_mapping(_sweep(num_samples=2)).name != a.name
    assert spec.from_mapping(_sweep(name="mine")).name == "mine"


def test_search_space_converts_to_tune_domains():
    from ray import tune

    s = spec.from_mapping(_sweep(search="grid", space={"model.fusion": {"choice": ["late", "early"]},
                                                       "train.lr": {"grid": [1e-3, 3e-3]}}))
    from mmray.sweep.tuning import param_space

    space = param_space(s)
    assert space["model.fusion"] == tune.grid_search(["late", "early"])  # grid search enumerates choices too
    assert space["train.lr"] == tune.grid_search([1e-3, 3e-3])
    r = spec.from_mapping(_sweep(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": {"randint": [0, 5]},
                                        "train.weight_decay": {"quniform": [0.0, 0.2, 0.05]},
                                        "train.micro_batch_size": {"choice": [16, 32]}}))
    space = param_space(r)
    assert {space["train.micro_batch_size"].sample() for _ in range(40)} == {16, 32}
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert space["train.lr"].lower == 1e-4 and space["train.lr"].upper == 1e-2
    assert isinstance(space["train.seed"], tune.search.sample.Integer)
    assert all(0 <= space["train.seed"].sample() < 5 for _ in range(20))
    assert all(round(space["train.weight_decay"].sample() / 0.05, 6).is_integer() for _ in range(20))


def test_points_add_keys_to_the_space_with_base_values():
    s = spec.from_mapping(_sweep(points=[{"model.fusion": "late", "data.source": "/elsewhere"}]))
    from mmray.sweep.tuning import param_space

    assert param_space(s)["data.source"] == config.from_dict(BASE).data.source


@pytest.mark.parametrize("sweep, needles", [
    ({"space": {"model.fusoin": {"grid": ["late"]}}}, ["sweep.space.model.fusoin", "Did you mean 'model.fusion'"]),
    ({"space": {"model.fusion": {"grid": ["atention"]}}}, ["sweep.space.model.fusion.grid", "'atention'",
                                                          "allowed values: late"]),
    ({"space": {"train.lr": {"loguniform": [0, 1e-2]}}}, ["sweep.space.train.lr.loguniform", "low > 0"]),
    ({"space": {"train.lr": {"uniform": [1e-2, 1e-3]}}}, ["sweep.space.train.lr.uniform", "must be below"]),
    ({"space": {"train.lr": {"uniform": [-1, 1e-3]}}}, ["sweep.space.train.lr.uniform", "train.lr", "minimum"]),
    ({"space": {"train.micro_batch_size": {"uniform": [8, 32]}}}, ["train.micro_batch_size is an integer"]),
    ({"space": {"train.zero_stage": {"grid": [1, 4]}}}, ["sweep.space.train.zero_stage.grid", "4"]),
    ({"space": {"train.lr": {"logunifrm": [1e-4, 1e-2]}}}, ["unknown kind 'logunifrm'", "Did you mean 'loguniform'"]),
    ({"space": {"train.lr": [1e-4, 1e-2]}}, ["sweep.space.train.lr: expected one of"]),
    ({"space": {"run.name": {"grid": ["a", "b"]}}}, ["sweep.space.run.name: cannot be searched"]),
    ({"space": {"train.num_workers": {"grid": [1, 2]}}}, ["sweep.space.train.num_workers: cannot be searched"]),
    ({"space": {}}, ["sweep.space is required"]),
    ({"metric": None}, ["sweep.metric is required"]),
    ({"metric": "vqa_acc"}, ["sweep.metric: 'vqa_acc'", "val_*"]),
    ({"metric": "val_vqa_accuracy"}, ["sweep.metric: 'val_vqa_accuracy' is not a held-out metric",
                                      "Did you mean 'val_vqa_acc'?", "val_vqa_acc_<question type>"]),
    ({"metric": "val_I2T_r@1"}, ["Did you mean 'val_i2t_r@1'?"]),
    ({"mode": "maximum"}, ["sweep.mode", "allowed values: max, min"]),
    ({"search": "bayes"}, ["sweep.search: 'bayes'", "random, grid, optuna"]),
    ({"search": "grid", "space": {"train.lr": {"uniform": [1e-4, 1e-3]}}}, ["search: grid", "sweep.space.train.lr"]),
    ({"num_samples": 0}, ["sweep.num_samples", ">= 1"]),
    ({"max_concurent": 2}, ["unknown key sweep.max_concurent", "Did you mean 'max_concurrent'"]),
    ({"scheduler": {"name": "hyperband"}}, ["sweep.scheduler.name: 'hyperband'", "asha, pbt, fifo"]),
    ({"scheduler": {"grace": 3}}, ["unknown key sweep.scheduler.grace", "grace_period"]),
    ({"scheduler": {"reduction_factor": 1}}, ["reduction_factor must be > 1"]),
    ({"scheduler": {"name": "pbt"}}, ["sweep.scheduler.name=pbt", "train.lr"]),
    ({"scheduler": {"name": "pbt", "mutations": ["model.fusion"]}}, ["sweep.scheduler.mutations", "model.fusion"]),
    ({"budget": {"usd": -1}}, ["sweep.budget.usd must be >= 0"]),
    ({"budget": {"usd": "ten"}}, ["sweep.budget.usd", "expected a number"]),
    ({"budget": {"usd": float("nan")}}, ["sweep.budget.usd", "expected a finite number, got nan"]),
    ({"budget": {"instance_type": "g9.huge"}}, ["sweep.budget.instance_type", "'g9.huge'"]),
    ({"budget": {"market": "spotty"}}, ["sweep.budget.market", "on-demand, spot"]),
    ({"budget": {"safety": 0.5}}, ["sweep.budget.safety"]),
    ({"points": [{"train.lr": 1e-3}]}, ["sweep.points[0]", "sets every grid key", "model.fusion"]),
    ({"points": [{"model.fusion": "late", "train.lrr": 1}]}, ["sweep.points[0]", "'train.lrr'"]),
])
def test_bad_sweep_names_the_key(sweep, needles):
    raw = _sweep(**sweep)
    raw["sweep"] = {k: v for k, v in raw["sweep"].items() if v is not None}
    with pytest.raises(ConfigError) as e:
        spec.from_mapping(raw)
    for needle in needles:
        assert needle in str(e.value)


def test_scheduler_needs_intermediate_metrics():
    raw = _sweep()
    raw["eval"] = {"every": 0}
    with pytest.raises(ConfigError, match="eval.every"):
        spec.from_mapping(raw)
    raw["sweep"]["scheduler"] = {"name": "fifo"}
    assert spec.from_mapping(raw).scheduler.name == "fifo"


def test_pbt_interval_is_a_multiple_of_checkpoints():
    raw = _sweep(space={"train.lr": {"loguniform": [1e-4, 1e-2]}}, scheduler={"name": "pbt"})
    raw["train"] = {**raw["train"], "checkpoint_every": 10}
    s = spec.from_mapping(raw)
    assert s.scheduler.perturbation_interval == 10 and s.scheduler.mutations == ("train.lr",)
    raw["sweep"]["scheduler"]["perturbation_interval"] = 15
    with pytest.raises(ConfigError, match="perturbation_interval"):
        spec.from_mapping(raw)


def test_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="no sweep: section"):
        spec.from_mapping(BASE)
    with pytest.raises(ConfigError, match="sweep.space and sweep.points are edited in the config file"):
        spec.from_mapping(_sweep(), ["sweep.space.train.lr=1"])
    with pytest.raises(ConfigError, match="unknown key train.lrr"):
        spec.from_mapping(_sweep(), ["train.lrr=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        spec.load(tmp_path / "missing.yaml")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_sweep()))
    assert spec.load(f, ["sweep.max_concurrent=2"]).max_concurrent == 2
    # a text key keeps its value as written (YAML would read 010 as the number 8, 2024-01-01 as a date)
    f.write_text(yaml.safe_dump(_sweep()) + "\n".join(["", "run:", "  name: 010", ""]))
    text = f.read_text().replace("sweep:\n", "sweep:\n  <<: {name: 010}\n  storage_path: 2024-01-01\n", 1)
    f.write_text(text)
    loaded = spec.load(f)
    assert (loaded.name, loaded.storage_path, loaded.config.run.name) == ("010", "2024-01-01", "010")
    f.write_text(text.replace("sweep:\n", "sweep:\n  budget: {instance_type: 010, usd: 5}\n", 1))
    with pytest.raises(ConfigError, match="sweep.budget.instance_type: '010' is not in the price table"):
        spec.load(f)  # a nested text key: the text, not the number 8


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=[p.name for p in SWEEP_CONFIGS])
def test_every_shipped_sweep_config_loads(path):
    s = spec.load(path)
    assert s.space and s.metric


def test_best_config_loads_with_mmray_config(tmp_path):
    s = spec.from_mapping(_sweep())
    f = tmp_path / "best_config.yaml"
    f.write_text(s.best_config_yaml({"model.fusion": "early"}, "# header\n"))
    cfg = config.load(f)
    assert cfg.model.fusion == "early" and cfg.model.decoder_depth == 1 and cfg == s.trial_config({"model.fusion":
                                                                                                   "early"})


# ------------------------------------------------------------------------------------------------- Pareto frontier

def test_pareto_front_maximising():
    points = [(1.0, 0.50), (2.0, 0.70), (3.0, 0.60), (2.0, 0.65), (4.0, 0.90), (0.5, 0.20), (None, 0.99), (1.0, None),
              (4.0, 0.90)]
    # (3, .6) is beaten by (2, .7); (2, .65) by (2, .7); the duplicate best point counts once per index
    assert report.pareto_front(points, "max") == [5, 0, 1, 4, 8]


def test_pareto_front_minimising_and_degenerate():
    points = [(1.0, 3.0), (2.0, 2.0), (2.5, 2.5), (3.0, 1.0)]
    assert report.pareto_front(points, "min") == [0, 1, 3]
    assert report.pareto_front([], "max") == []
    assert report.pareto_front([(1.0, 1.0)], "min") == [0]


# ---------------------------------------------------------------------------------------------- budget arithmetic

def test_trial_price_is_its_share_of_an_instance():
    table = prices.load()
    gpu = price_trial({"CPU": 2, "GPU": 1}, table.get("g5.12xlarge"), "on-demand", cluster_cpus=48)
    assert gpu.share == pytest.approx(1 / table.get("g5.12xlarge").gpus)
    assert gpu.usd_per_hour == pytest.approx(table.get("g5.12xlarge").on_demand_usd_per_hour * gpu.share)
    assert gpu.gpus == 1
    cpu = price_trial({"CPU": 1, "GPU": 0}, table.get("m6i.xlarge"), "spot", cluster_cpus=64)
    assert cpu.usd_per_hour == pytest.approx(table.get("m6i.xlarge").spot_usd_per_hour / 4)
    local = prices.InstancePrice("local", 3.6, 3.6, 0, "", 0, 0, 0)  # no vCPUs: the Ray cluster is the node
    assert price_trial({"CPU": 1}, local, "on-demand", cluster_cpus=4).usd_per_hour == pytest.approx(0.9)


def test_step_time_estimates():
    assert estimate([]) is None
    startup, step = estimate([[12.0, 2.0], [20.0, 6.0]])
    assert step == pytest.approx(2.0) and startup == pytest.approx(8.0)
    assert estimate([[10.0, 5.0]]) == (0.0, 2.0)  # one report: an upper bound, no start-up
    limits = Limits(safety=1.5, stop_reserve_s=10)
    assert projected_seconds(100, 2.0, 8.0, limits) == pytest.approx((8 + 200) * 1.5 + 10)


def _ledger(**limits) -> tuple[Ledger, list[float]]:
    price = TrialPrice(usd_per_hour=3.6, gpus=1.0, instance_type="x", market="on-demand", instance_usd_per_hour=3.6,
                       share=1.0)  # $0.001 and 1/3600 GPU-h per second
    return Ledger(path="", price=price, limits=Limits(**limits), max_steps=100), [0.0]


def test_ledger_admits_trials_while_projections_fit():
    ledger, _ = _ledger(usd=1.0, safety=1.0, stop_reserve_s=10, step_s=2.0, startup_s=50)
    new_s = 50 + 100 * 2.0 + 10  # 260 s = $0.26
    assert ledger.projected_new_s() == pytest.approx(new_s)
    for i in range(3):  # 3 x $0.26 = $0.78 committed: a fourth ($1.04) would not fit
        ok, why = ledger.can_admit(0.0)
        assert ok, why
        ledger.admit(f"t{i}", 0.0)
        ledger.started(f"t{i}", 0.0)
    ok, why = ledger.can_admit(0.0)
    assert not ok and "$0.7800 committed" in why and "$1.0000 cap" in why
    # t0 reports: 60 s in, at step 5 -> measured 2.0 s/step and 50 s start-up; it has 95 steps (+ stop) to go
    ledger.progress("t0", 60.0, 5.0, 60.0)
    ledger.progress("t0", 70.0, 10.0, 70.0)
    assert ledger.step_estimate() == pytest.approx((50.0, 2.0))
    assert ledger.remaining_s("t0", 70.0) == pytest.approx(90 * 2.0 + 10)
    ledger.ended("t0", 70.0)  # stopped early by the scheduler: its spend is final, its commitment freed
    assert ledger.trial_spent("t0", 100.0, "usd") == pytest.approx(0.07)
    assert ledger.spent(100.0)["usd"] == pytest.approx(0.07 + 0.1 + 0.1)
    assert ledger.spent(100.0)["gpu_hours"] == pytest.approx(270 / 3600)
    ok, why = ledger.can_admit(100.0)  # $0.27 spent + 2 x ($0.26 - $0.10 elapsed) + $0.26 = $0.85
    assert ok, why


def test_ledger_pilot_runs_alone_without_an_estimate():
    ledger, _ = _ledger(usd=1.0, stop_reserve_s=10)
    assert ledger.can_admit(0.0)[0]
    ledger.admit("pilot", 0.0)
    ok, why = ledger.can_admit(1.0)
    assert not ok and "pilot" in why
    ledger.started("pilot", 1.0)
    ledger.progress("pilot", 30.0, 10.0, 31.0)
    assert ledger.step_estimate() == (0.0, 3.0)
    # measured now: $0.03 spent + $0.3475 committed to the pilot + $0.385 for a new trial ((100 x 3 x 1.25 + 10) s)
    ok, why = ledger.can_admit(31.0)
    assert ok and "385 s" in why


def test_ledger_stops_when_only_the_stops_fit():
    ledger, _ = _ledger(usd=0.1, safety=1.0, stop_reserve_s=20, step_s=0.1)
    ledger.admit("a", 0.0)
    ledger.started("a", 0.0)
    ledger.admit("b", 0.0)
    ledger.started("b", 0.0)
    assert not ledger.must_stop(20.0)[0]  # $0.04 spent + 2 stops x 20 s ($0.04) < $0.10
    stop, why = ledger.must_stop(30.0)  # $0.06 + $0.04 reaches the cap
    assert stop and "2 running trial(s)" in why
    ledger.exhaust(why, 30.0)
    ledger.ended("a", 45.0)
    ledger.ended("b", 48.0)
    assert ledger.trials["a"]["stopped_for_budget"] and ledger.spent(100.0)["usd"] == pytest.approx(0.093)
    assert ledger.spent(100.0)["usd"] <= 0.1
    assert ledger.can_admit(100.0) == (False, why)


def test_gpu_hour_cap():
    ledger, _ = _ledger(gpu_hours=0.05, safety=1.0, stop_reserve_s=0, step_s=1.0, startup_s=0)
    ok, why = ledger.can_admit(0.0)  # 100 s = 0.0278 GPU-h fits 0.05
    assert ok
    ledger.admit("a", 0.0)
    ok, why = ledger.can_admit(0.0)
    assert not ok and "GPU-h" in why


def test_ledger_survives_a_restart(tmp_path):
    path = str(tmp_path / "ledger.json")
    ledger, _ = _ledger(usd=1.0)
    ledger.path = path
    ledger.admit("a", 0.0)
    ledger.started("a", 0.0)
    ledger.progress("a", 10.0, 2.0, 10.0)
    ledger.save(50.0, force=True)  # then the driver dies while "a" runs
    again, _ = _ledger(usd=1.0)
    again.path = path
    assert again.restore()
    assert again.trials["a"]["intervals"] == [[0.0, 50.0]]  # charged up to the last save
    assert again.spent(1000.0)["usd"] == pytest.approx(0.05)
    again.started("a", 60.0)  # resumed
    assert again.trials["a"]["starts"] == 2 and again.spent(70.0)["usd"] == pytest.approx(0.06)


# ------------------------------------------------------------------------------------- Tune pieces, no cluster

def test_optuna_search_samples_the_space():
    s = spec.from_mapping(_sweep(search="optuna", space={"model.fusion": {"choice": ["late", "attention"]},
                                                         "train.lr": {"loguniform": [1e-4, 1e-2]}},
                                 points=[{"model.fusion": "attention", "train.lr": 1e-3}]))
    from mmray.sweep.tuning import param_space, search_algorithm

    searcher = search_algorithm(s, max_concurrent=2).searcher  # SearchGenerator(ConcurrencyLimiter(OptunaSearch))
    assert searcher.set_search_properties(s.metric, s.mode, param_space(s))
    first, second = searcher.suggest("t1"), searcher.suggest("t2")
    assert first == {"model.fusion": "attention", "train.lr": 1e-3}  # the point comes first
    assert second["model.fusion"] in ("late", "attention") and 1e-4 <= second["train.lr"] <= 1e-2
    assert searcher.suggest("t3") is None  # max_concurrent
    searcher.on_trial_complete("t1", {s.metric: 0.5, "step": 20})
    assert searcher.suggest("t3") is not None
    with pytest.raises(ConfigError, match="Optuna samples the space"):
        spec.from_mapping(_sweep(search="optuna"))


def test_asha_keeps_its_rungs_across_a_restore(tmp_path):
    from types import SimpleNamespace

    from mmray.sweep.tuning import ResumableASHA

    def asha():
        return ResumableASHA(str(tmp_path / "asha.json"), time_attr="step", max_t=8, grace_period=2,
                             reduction_factor=2, metric="val_vqa_acc", mode="max", stop_last_trials=False)

    first, good, bad = asha(), SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"step": 2, "val_vqa_acc": 0.5}) == "CONTINUE"
    restored = asha()  # a new driver: --resume
    restored.on_trial_add(None, bad)
    assert restored.on_trial_result(None, bad, {"step": 2, "val_vqa_acc": 0.1}) == "STOP"
    fresh = ResumableASHA(str(tmp_path / "other.json"), time_attr="step", max_t=8, grace_period=2,
                          reduction_factor=2, metric="val_vqa_acc", mode="max")
    fresh.on_trial_add(None, bad)
    assert fresh.on_trial_result(None, bad, {"step": 2, "val_vqa_acc": 0.1}) == "CONTINUE"  # what Tune alone does


def test_pbt_adopts_a_copy_of_the_donor_run(tmp_path):
    from mmray.sweep.trial import adopt_run

    donor = tmp_path / "runs" / "t1"
    (donor / "checkpoint_00000004").mkdir(parents=True)
    (donor / "checkpoint_00000004" / "state.json").write_text('{"step": 4}')
    (donor / "checkpoint_manager_snapshot.json").write_text("{}")
    (donor / "cost.json").write_text("{}")
    adopt_run(str(donor), str(tmp_path / "runs" / "t2-g1"))
    copy = tmp_path / "runs" / "t2-g1"
    assert (copy / "checkpoint_00000004" / "state.json").read_text() == '{"step": 4}'
    assert (copy / "checkpoint_manager_snapshot.json").exists() and not (copy / "cost.json").exists()
    assert (donor / "cost.json").exists()


class _Meter:
    """A cost source standing in for the cost meter: the whole cluster, head and idle time included."""

    def __init__(self, spent: float, burn: float):
        self.spent, self.burn = spent, burn

    def spent_usd(self, ledger, now):
        return max(self.spent, sum(ledger.trial_spent(t, now, "usd") for t in ledger.trials))

    def burn_usd_per_hour(self, now):
        return self.burn


def test_ledger_charges_the_metered_cluster_when_it_costs_more_than_its_trials():
    ledger, _ = _ledger(usd=1.0, safety=1.0, stop_reserve_s=10, step_s=2.0, startup_s=50)
    ledger.cost_source = _Meter(spent=0.0, burn=3.6 * 4)  # the cluster burns 4x what one trial is priced at
    ok, why = ledger.can_admit(0.0)  # a new trial: 260 s at $14.40/h (it alone on the cluster) = $1.04
    assert not ok and "$1.0400 projected" in why
    ledger.cost_source = _Meter(spent=0.0, burn=3.6)  # no more than the trial: its own price stands
    assert ledger.can_admit(0.0)[0]
    ledger.admit("a", 0.0)
    ledger.started("a", 0.0)
    ledger.cost_source = _Meter(spent=0.95, burn=3.6 * 2)  # the meter saw $0.95 (the trial alone: $0.001)
    assert ledger.spent(1.0)["usd"] == pytest.approx(0.95)
    stop, why = ledger.must_stop(1.0)  # $0.95 + a 10 s stop at $7.20/h = $0.97 < $1
    assert not stop, why
    ledger.cost_source = _Meter(spent=0.99, burn=3.6 * 2)  # $0.99 + $0.02 >= $1
    stop, why = ledger.must_stop(2.0)
    assert stop and "$0.9900 spent" in why


def test_budget_usd_of_a_sweep_config_caps_the_whole_sweep():
    s = spec.from_mapping({**_sweep(), "budget": {"usd": 7}})
    assert s.budget.usd == 7 and s.config.budget.usd == 0  # the sweep's cap; trials are not capped one by one
    assert s.trial_config({"model.fusion": "late", "run.name": "t1"}).budget.usd == 0
    assert spec.from_mapping({**_sweep(budget={"usd": 7}), "budget": {"usd": 7}}).budget.usd == 7
    with pytest.raises(config.ConfigError, match="disagree"):
        spec.from_mapping({**_sweep(budget={"usd": 5}), "budget": {"usd": 7}})
    assert spec.from_mapping(_sweep(), ["budget.usd=3"]).budget.usd == 3


class _Grid:
    """A search with ``n`` trials left (the part of Tune's SearchAlgorithm interface BudgetGate uses)."""

    def __init__(self, n: int):
        self.left, self.finished = n, False

    def next_trial(self):
        if self.left:
            self.left -= 1
            return type("Trial", (), {"trial_id": f"t{self.left}", "config": {}})()
        self.finished = True
        return None

    def is_finished(self):
        return self.finished

    def set_finished(self):
        self.finished = True


@pytest.mark.parametrize("left, for_budget", [(0, False), (1, True)])
def test_a_sweep_ends_for_budget_only_when_the_search_had_a_trial_left(left, for_budget):
    """A grid that ran every trial is finished, not stopped for budget, even when another trial would not fit."""
    from mmray.sweep.tuning import BudgetGate

    ledger, _ = _ledger(usd=0.01, safety=1.0, stop_reserve_s=10, step_s=2.0, startup_s=50)
    assert not ledger.can_admit(0.0)[0] and not ledger.active()
    gate = BudgetGate(_Grid(left), ledger, clock=lambda: 0.0)
    assert gate.next_trial() is None and gate.is_finished()
    assert bool(ledger.exhausted) is for_budget


def test_a_sweep_whose_every_trial_failed_exits_1_with_its_summary(tmp_path, monkeypatch, capsys):
    """A sweep asked for a metric no trial reports (or whose trials all crash) ran, but found nothing: exit 1."""
    import argparse
    import json

    from mmray import cli
    from mmray.sweep import commands, runner

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"sweep": {"metric": "loss", "mode": "min",
                                           "space": {"model.fusion": {"grid": ["late", "attention"]}}}}))
    args = argparse.Namespace(config=str(f), overrides=[], resume=False)
    outcome = {"trials": 2, "errored": 2, "best_config": None, "outputs": {"results_csv": "/s/results.csv"}}
    monkeypatch.setattr(runner, "run_sweep", lambda spec, resume=False: dict(outcome))
    assert cli.run(commands.cmd_sweep, args) == cli.EXIT_ERROR
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kind"] == "error" and last["errored"] == 2 and last["best_config"] is None
    assert last["error"] == "every trial of the sweep failed (2); their errors are in /s/results.csv (column error)"
    monkeypatch.setattr(runner, "run_sweep", lambda spec, resume=False: {**outcome, "errored": 1})
    assert cli.run(commands.cmd_sweep, args) == cli.EXIT_OK


@pytest.mark.parametrize("metric, fusions, model, ok", [
    ("val_vqa_acc", ["late", "attention"], {}, False),                              # no decoder: no VQA
    ("val_vqa_acc", ["late", "attention"], {"decoder_depth": 1, "vqa_weight": 1}, True),
    ("val_i2t_r@1", ["early", "hierarchical"], {}, False),                          # fused towers: no embeddings
    ("val_i2t_r@1", ["early", "late"], {}, True),                                   # late's trial reports it
    ("val_itm_acc", ["late"], {}, False),
    ("loss", ["late"], {}, True),
])
def test_a_metric_no_trial_reports_is_refused_before_the_sweep(metric, fusions, model, ok):
    raw = {"metric": metric, "space": {"model.fusion": {"grid": fusions}}}
    base = {"eval": {"every": 2}, "model": model}
    if ok:
        spec.parse(raw, base)
    else:
        with pytest.raises(ConfigError, match=rf"sweep.metric: '{metric}' is computed from the .* objective, which "
                                              "no trial of this sweep trains"):
            spec.parse(raw, base)
