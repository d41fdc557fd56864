"""budget.usd is a hard cap: a run priced high enough to reach it within seconds checkpoints and stops before it,
and a rerun of a run whose budget is spent refuses to start (exit 2) instead of spending more."""
import json
from pathlib import Path

import pytest

from mmray import config
from mmray.cost import meter
from mmray.train.trainer import train

from tiny_config import GLOBAL, tiny_cfg

# 60 s at $36/h. The guard's first decision, before step 1, needs the start-up (Ray Train, DeepSpeed, the data
# pipeline: 15-40 s on 2 busy cores) plus its stop reserve to fit: with the default guess of an unmeasured checkpoint
# (budget.checkpoint_s, 30 s x 1.25) a slow start left no room and the run stopped at step 0; this tiny model's
# checkpoints take about a second.
BUDGET = 0.6
PRICE_PER_S = 0.01  # $36/h for the one local node


def test_training_stops_for_budget_and_never_exceeds_it(ray_session, tiny_dataset, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(f"instances:\n  local: {{on_demand_usd_per_hour: {PRICE_PER_S * 3600}, "
                      f"spot_usd_per_hour: {PRICE_PER_S * 3600}}}\n")
    cfg = tiny_cfg(tiny_dataset, tmp_path / "runs", "run.name=budget", "train.max_steps=100000",
                   "train.checkpoint_every=4", "train.log_every=4", f"budget.usd={BUDGET}",
                   f"budget.prices={prices}", "budget.teardown_s=2", "budget.checkpoint_s=2",
                   "budget.meter_interval_s=0.5")
    summary = train(cfg)

    assert summary["stopped_for_budget"] is True
    assert 0 < summary["steps"] < 100000 and summary["samples_seen"] == summary["steps"] * GLOBAL
    assert 0 < summary["spent_usd"] <= BUDGET and summary["budget_usd"] == BUDGET
    assert "val_i2t_r@1" not in summary["metrics"]  # stopped without evaluating
    state = json.loads((Path(summary["checkpoint"]) / "state.json").read_text())
    assert state["step"] == summary["steps"]  # the stop was checkpointed: nothing trained is lost
    cost = json.loads((tmp_path / "runs" / "budget" / "cost.json").read_text())
    assert cost["spent_usd"] == pytest.approx(summary["spent_usd"], abs=1e-6) and cost["stopped"]
    # The loop reported its progress (at each log line, and when it stopped): `mmray cost` forecasts the time and
    # dollars to finish.
    progress = cost["progress"]
    assert progress["total_samples"] == 100000 * GLOBAL and progress["samples_per_s"] > 0
    assert progress["samples_seen"] == summary["samples_seen"]
    forecast = meter.report(str(tmp_path / "runs" / "budget"))["forecast"]
    assert forecast["seconds"] > 0 and forecast["over_budget"] is True  # 100,000 steps at $36/h: far over $0.60

    # Same cap again: what is left cannot pay for a start, so it refuses before Ray Train starts.
    refuse_cfg = tiny_cfg(tiny_dataset, tmp_path / "runs", "run.name=budget", "train.max_steps=100000",
                          "train.checkpoint_every=4", f"budget.usd={cost['spent_usd']!r}", f"budget.prices={prices}")
    with pytest.raises(config.ConfigError, match=r"has spent \$.* raise budget.usd to continue"):
        train(refuse_cfg)
    # A little more than spent, less than a checkpoint and a stop cost at $36/h: refused too, since the budget guard
    # decides only after the first step (this rerun would start, train nothing and end over the cap).
    short_cfg = tiny_cfg(tiny_dataset, tmp_path / "runs", "run.name=budget", "train.max_steps=100000",
                         "train.checkpoint_every=4", f"budget.usd={cost['spent_usd'] + 0.03!r}",
                         f"budget.prices={prices}", "budget.teardown_s=2", "budget.checkpoint_s=2")
    with pytest.raises(config.ConfigError, match=r"left, less than one checkpoint and stop costs at \$36.00/h "
                                                 r"\(\d s: \$0.0450\)"):  # 2 s x 1.25 + 2 s
        train(short_cfg)
    after = json.loads((tmp_path / "runs" / "budget" / "cost.json").read_text())
    assert after["spent_usd"] <= cost["spent_usd"] + 0.03  # the refused start stayed within the cap
