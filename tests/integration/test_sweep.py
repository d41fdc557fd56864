"""`mmray sweep` end to end on the session's Ray: a tiny sweep over the four fusion strategies on the shapes VQA data
with ASHA and a priced budget, interrupted after its first finished trial and resumed, with one failing trial.

One sweep serves every check, since each trial is a whole Ray Train + DeepSpeed run (seconds of start-up on 2
cores). ASHA's decisions must not depend on timing, so: two points come first, a trial that fails (its data set does
not exist) and attention fusion at a learning rate 50x the base one; without a first estimate of the step time, the
budget runs each of them alone (the pilot) until it has reported, so attention records the first rung (step 2)
before any other trial gets there. The grid's trials (hierarchical, early, late at the base rate, two at a time)
reach that rung with a held-out caption loss still near its initial value, worse than attention's, so ASHA stops at
least the first of them there, after the resume too (the sweep's ASHA keeps its rungs across a restore).

Whether the sweep ranks a cross-modal strategy above late fusion on compositional VQA questions needs hundreds of
steps per trial: bench/sweep_overhead.py --fusion-check measures it (see BENCHMARKS.md).
"""
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from ray.tune import Callback

from mmray import cli, config
from mmray.sweep import commands, spec as spec_lib
from mmray.sweep.runner import run_sweep

from sweep_results import results_rows

GRID = ["hierarchical", "early", "late"]  # after the points: the failing one and attention (see the docstring)
BASE_LR, POINT_LR = 1e-4, 5e-3
MAX_STEPS = 4
PRICE_PER_HOUR = 3.6  # the `local` node at $3.60/h: a trial (1 of its 4 CPUs) costs $0.00025/s
BUDGET_USD = 1.0


class InterruptAfter(Callback):
    """Interrupts the sweep's driver (SIGUSR1, Tune's stop signal, like Ctrl-C) once ``n`` trials have finished: the
    cheapest stand-in for a killed driver that leaves finished, running and unstarted trials behind. Once only: Tune
    restores its callbacks with the sweep."""

    def __init__(self, n: int, marker: str):
        self.n, self.marker, self.finished = n, marker, []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.append(trial.trial_id)
        if len(self.finished) == self.n and not os.path.exists(self.marker):
            Path(self.marker).write_text("\n".join(self.finished))
            os.kill(os.getpid(), signal.SIGUSR1)


def _raw(data: str, storage: str, prices: str) -> dict:
    return {
        "data": {"source": data, "image_size": 32, "max_text_len": 24, "shuffle_buffer": 64},
        "model": {"image_depth": 1, "text_depth": 1, "image_width": 64, "text_width": 64, "embed_dim": 32,
                  "decoder_depth": 1, "vqa_weight": 1, "caption_weight": 1, "contrastive_weight": 0,
                  "itm_weight": 0},
        "train": {"num_workers": 1, "micro_batch_size": 16, "max_steps": MAX_STEPS, "warmup_steps": 1,
                  "log_every": 2, "checkpoint_every": 2, "lr": BASE_LR},
        "eval": {"every": 2, "max_samples": 16, "generate": False},
        "budget": {"prices": prices},
        "sweep": {
            "name": "fusions", "storage_path": storage, "metric": "val_caption_loss", "mode": "min",
            "search": "grid", "max_concurrent": 2,
            "space": {"model.fusion": {"grid": GRID}},
            "points": [{"model.fusion": "late", "data.source": f"{storage}/no-such-data"},  # fails
                       {"model.fusion": "attention", "train.lr": POINT_LR}],
            "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
            "budget": {"usd": BUDGET_USD, "stop_reserve_s": 20.0},  # no first estimate: a pilot runs alone
        },
    }


@pytest.fixture
def sweep(tiny_dataset, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"instances": {"local": {"on_demand_usd_per_hour": PRICE_PER_HOUR,
                                                              "spot_usd_per_hour": PRICE_PER_HOUR}}}))
    return spec_lib.from_mapping(_raw(tiny_dataset, str(tmp_path / "sweeps"), str(prices)))


def _ledger(spec) -> dict:
    return json.loads((Path(spec.sweep_dir) / "ledger.json").read_text())


def test_sweep_under_asha_and_budget_survives_an_interruption(ray_session, sweep, tmp_path, placement_group_release):
    marker = str(tmp_path / "interrupted")
    first = run_sweep(sweep, callbacks=[InterruptAfter(1, marker)])
    assert first["interrupted"]
    finished = Path(marker).read_text().split()
    before = _ledger(sweep)["trials"]
    assert all(before[t]["done"] and before[t]["starts"] == 1 for t in finished)
    runs = Path(sweep.sweep_dir) / "runs"
    run_files = {p: p.stat().st_mtime_ns for t in finished for p in (runs / t).rglob("*")}

    # The interruption stands in for a killed driver, whose placement groups Ray removes with it; this driver (the
    # test process) lives on, so remove what the interrupted trials still hold, as Ray would. (Left in place, a
    # trial's 1-CPU group starves the resumed sweep's data tasks on the 4-CPU session Ray.)
    placement_group_release()

    # A new sweep may not reuse the directory; --resume continues it through Tuner.restore.
    with pytest.raises(config.ConfigError, match="--resume"):
        run_sweep(sweep)
    summary = run_sweep(sweep, resume=True)

    # Resumed: the trials that had finished were not run again (one start each, run directories untouched).
    ledger = _ledger(sweep)
    assert not summary["interrupted"] and ledger["search_done"]
    assert all(ledger["trials"][t]["starts"] == 1 for t in finished)
    assert {p: p.stat().st_mtime_ns for t in finished for p in (runs / t).rglob("*")} == run_files

    # Every trial is in the results: the four strategies and the failing point, recorded with its error.
    rows = {r["trial_id"]: r for r in results_rows(sweep)}
    assert summary["trials"] == 5 and len(rows) == 5
    assert sorted(r["model.fusion"] for r in rows.values()) == sorted(GRID + ["attention", "late"])
    failed = [r for r in rows.values() if r["status"] == "ERROR"]
    assert summary["errored"] == 1 and len(failed) == 1 and "no-such-data" in failed[0]["error"]

    # Attention trained to the end; ASHA stopped grid trials at a rung (at least the first to reach step 2, against
    # attention's value there).
    assert [rows[t]["model.fusion"] for t in finished] == ["attention"]
    assert rows[finished[0]]["steps"] == str(MAX_STEPS) and rows[finished[0]]["stopped_early"] == "False"
    stopped = [r for r in rows.values() if r["stopped_early"] == "True"]
    assert summary["stopped_early"] == len(stopped) >= 1
    assert all(r["stopped_by"] == "asha" and int(r["steps"]) < MAX_STEPS and r["model.fusion"] in GRID
               for r in stopped)

    # Within its budget, in real (priced) dollars: the cost meter's figure for the whole cluster (sweep directory's
    # cost.json, continued across the interruption), never less than the trials' own cost; each trial's cost is its
    # wall time at its price.
    cost = json.loads((Path(sweep.sweep_dir) / "cost.json").read_text())
    assert cost["restarts"] == 1 and cost["stopped"]
    assert summary["metered_usd"] == pytest.approx(cost["spent_usd"], abs=1e-6)
    assert 0 < summary["spent_usd"] <= summary["budget_usd"] == BUDGET_USD
    assert summary["spent_usd"] == pytest.approx(max(summary["metered_usd"], summary["trials_usd"]), abs=1e-6)
    assert summary["metered_usd"] >= summary["trials_usd"] * 0.9  # the cluster costs at least what its trials use
    assert not summary["stopped_for_budget"]
    assert sum(float(r["cost_usd"]) for r in rows.values()) == pytest.approx(summary["trials_usd"], abs=1e-5)
    for r in rows.values():
        assert float(r["cost_usd"]) == pytest.approx(float(r["wall_s"]) * PRICE_PER_HOUR * 0.25 / 3600, abs=2e-6)

    # Outputs: the table, the plots, and a best config that `mmray train --config` accepts as it is.
    out = summary["outputs"]
    for key in ("results_csv", "best_config", "metric_vs_cost_png", "best_per_fusion_png", "learning_curves_png"):
        assert Path(out[key]).is_file() and Path(out[key]).stat().st_size > 0, key
    assert summary["best_trial"] == finished[0]
    best = config.load(out["best_config"])
    assert (best.model.fusion, best.train.lr) == ("attention", POINT_LR)
    assert best.data.source == sweep.config.data.source and best.run.name == ""
    assert summary["best_metric"] == pytest.approx(float(rows[finished[0]]["val_caption_loss"]))


def test_cli_rejects_a_bad_sweep_before_ray_starts(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="mmray")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c")
        sp.add_argument("overrides", nargs="*")

    commands.register(sub, with_config)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"eval": {"every": 2}, "sweep": {"metric": "val_vqa_acc",
                                                                 "space": {"model.fusion": {"grid": ["lat"]}}}}))
    args = parser.parse_args(["sweep", "--config", str(f)])
    assert cli.run(args.fn, args) == cli.EXIT_BAD_INPUT
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kind"] == "bad_input" and "sweep.space.model.fusion.grid" in last["error"]
