"""The cost meter as a Ray actor: exact dollars for nodes that join and leave (scripted node list and clock), the real
session node priced as `local`, and a total that survives killing the actor without resetting or counting twice.

The session Ray is one local node without labels, so the cluster is scripted: the meter's node listing and clock
are closures (pickled by value into the actor) that read a small JSON file the test rewrites between samples.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mmray.cost import meter as meter_lib
from mmray.cost.prices import INSTANCE_LABEL, MARKET_LABEL

# Round prices (USD per hour) so that every expected total below is computed by hand.
PRICES = """\
instances:
  m6i.xlarge: {on_demand_usd_per_hour: 0.18}
  g5.xlarge: {on_demand_usd_per_hour: 1.08, spot_usd_per_hour: 0.36}
  local: {on_demand_usd_per_hour: 0.5, spot_usd_per_hour: 0.5}
"""
HEAD = {INSTANCE_LABEL: "m6i.xlarge", MARKET_LABEL: "on-demand"}
SPOT = {INSTANCE_LABEL: "g5.xlarge", MARKET_LABEL: "spot"}
ON_DEMAND = {INSTANCE_LABEL: "g5.xlarge", MARKET_LABEL: "on-demand"}


def _node(node_id: str, labels: dict, alive: bool = True) -> dict:
    return {"node_id": node_id, "alive": alive, "labels": labels}


class Script:
    """The scripted cluster: a JSON file with the clock and the node list the meter sees next."""

    def __init__(self, path: Path):
        self.path = path

    def set(self, now: float, nodes: list[dict]) -> None:
        self.path.write_text(json.dumps({"now": now, "nodes": nodes}))

    def functions(self):
        path = str(self.path)

        def clock() -> float:
            return json.loads(Path(path).read_text())["now"]

        def list_nodes() -> list[dict]:
            return json.loads(Path(path).read_text())["nodes"]

        return list_nodes, clock


@pytest.fixture
def prices_file(tmp_path):
    f = tmp_path / "prices.yaml"
    f.write_text(PRICES)
    return str(f)


def _meter(ray, run_dir: str, prices_file: str, script: Script, **kwargs):
    list_nodes, clock = script.functions()
    return meter_lib.start_meter(run_dir, prices_path=prices_file, list_nodes=list_nodes, clock=clock,
                                 autostart=False, **kwargs)


def _kill(ray, handle, run_dir: str) -> None:
    ray.kill(handle, no_restart=True)
    deadline = time.time() + 20
    while meter_lib.get_meter(run_dir) is not None and time.time() < deadline:
        time.sleep(0.1)
    assert meter_lib.get_meter(run_dir) is None


def test_nodes_joining_and_leaving_are_charged_exactly(ray_session, tmp_path, prices_file):
    ray = ray_session
    run_dir = str(tmp_path / "run")
    script = Script(tmp_path / "cluster.json")
    script.set(0, [_node("head", HEAD), _node("w1", SPOT), _node("old", SPOT, alive=False)])
    m = _meter(ray, run_dir, prices_file, script, budget_usd=3.0)
    status = ray.get(m.sample.remote())
    assert status["nodes_alive"] == 2 and status["spent_usd"] == 0  # "old" died before the meter: never charged
    assert status["burn_usd_per_hour"] == pytest.approx(0.18 + 0.36)

    script.set(1800, [_node("head", HEAD), _node("w1", SPOT), _node("w2", ON_DEMAND)])  # w2 joins
    status = ray.get(m.sample.remote())
    assert status["spent_usd"] == pytest.approx(0.5 * (0.18 + 0.36))
    assert status["burn_usd_per_hour"] == pytest.approx(0.18 + 0.36 + 1.08)

    script.set(3600, [_node("head", HEAD), _node("w1", SPOT, alive=False), _node("w2", ON_DEMAND)])  # w1 dies
    ray.get(m.sample.remote())
    script.set(5400, [_node("head", HEAD), _node("w3", {})])  # w2 vanishes, an unlabelled node joins ($0.5 local)
    ray.get(m.sample.remote())
    script.set(7200, [_node("head", HEAD), _node("w3", {})])
    status = ray.get(m.sample.remote())
    # head 2 h x 0.18 + w1 1 h x 0.36 (up to the sample that saw it dead) + w2 1 h x 1.08 (1800 -> 5400)
    # + w3 0.5 h x 0.5
    expected = 2 * 0.18 + 1 * 0.36 + 1 * 1.08 + 0.5 * 0.5
    assert status["spent_usd"] == pytest.approx(expected)
    assert status["burn_usd_per_hour"] == pytest.approx(0.18 + 0.5)
    assert (status["nodes_alive"], status["nodes_seen"]) == (2, 4)

    state = meter_lib.read_state(run_dir)
    nodes = state["nodes"]
    assert nodes["w1"]["usd"] == pytest.approx(0.36) and not nodes["w1"]["alive"]
    assert nodes["w2"]["usd"] == pytest.approx(1.08) and nodes["w2"]["market"] == "on-demand"
    assert nodes["w3"]["instance_type"] == "local" and nodes["w3"]["priced_by"] == "local"
    assert [p[0] for p in state["series"]] == [0, 1800, 3600, 5400, 7200]
    assert state["series"][-1][1] == pytest.approx(expected)

    # Between samples the spend keeps running at the burn rate; the forecast uses it.
    script.set(9000, [_node("head", HEAD), _node("w3", {})])
    assert ray.get(m.spent_usd.remote()) == pytest.approx(expected + 0.68 * 0.5)
    fc = ray.get(m.forecast.remote(7200, 2.0))  # 3600 s more at $0.68/h
    assert fc["seconds"] == 3600 and fc["usd"] == pytest.approx(0.68)
    assert fc["total_usd"] == pytest.approx(expected + 0.34 + 0.68)  # $3.07
    assert fc["over_budget"] is True  # the $3 budget
    ray.get(m.report_progress.remote(1000, 2.0, 10000, save=False))  # a log line's: kept, saved with the next write
    assert (meter_lib.read_state(run_dir)["progress"] or {}).get("samples_seen") != 1000
    ray.get(m.report_progress.remote(2800, 2.0, 10000))
    _kill(ray, m, run_dir)

    # `mmray cost RUN_DIR --plot`: the saved figures, the forecast from the reported progress, and a PNG.
    import argparse

    png = tmp_path / "spend.png"
    summary = meter_lib.report(run_dir, now=7200)
    assert summary["spent_usd"] == pytest.approx(expected) and summary["budget_usd"] == 3.0
    assert summary["forecast"]["seconds"] == 3600  # (10000 - 2800) samples at 2/s
    assert summary["forecast"]["total_usd"] == pytest.approx(expected + 0.68) and not summary["forecast"]["over_budget"]
    from mmray.cost.commands import cmd_cost

    out = cmd_cost(argparse.Namespace(run_dir=run_dir, plot=str(png)))
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_session_node_is_priced_as_local(ray_session, tmp_path):
    """The real Ray node (no labels) is priced by the `local` entry; at $3600/h it costs $1 per second."""
    ray = ray_session
    f = tmp_path / "prices.yaml"
    f.write_text("instances:\n  local: {on_demand_usd_per_hour: 3600, spot_usd_per_hour: 3600}\n")
    run_dir = str(tmp_path / "run")
    m = meter_lib.start_meter(run_dir, prices_path=str(f), autostart=False)
    ray.get(m.sample.remote())
    time.sleep(0.3)
    status = ray.get(m.sample.remote())
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    state = meter_lib.read_state(run_dir)
    (t1, _, burn), (t2, spent, _) = state["series"]
    assert burn == pytest.approx(3600 * alive)
    assert spent == pytest.approx((t2 - t1) * alive) and spent >= 0.3 * alive
    assert status["spent_usd"] >= spent
    assert {n["priced_by"] for n in state["nodes"].values()} == {"local"}
    _kill(ray, m, run_dir)


def test_the_meter_samples_in_the_background(ray_session, tmp_path):
    ray = ray_session
    run_dir = str(tmp_path / "run")
    m = meter_lib.start_meter(run_dir, interval_s=0.2)  # autostart: one sample now, then every 0.2 s

    def points() -> int:
        state = meter_lib.read_state(run_dir)  # None until the actor has started and sampled once
        return len(state["series"]) if state else 0

    deadline = time.time() + 20
    while points() < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert points() >= 3
    assert meter_lib.get_meter(run_dir) is not None  # found by name, e.g. from a training worker
    status = ray.get(m.stop.remote())
    assert status["nodes_alive"] >= 1 and meter_lib.read_state(run_dir)["stopped"]
    # A late sample (a run's last checkpoint asks for one, unwaited) leaves the clean end as it is.
    ray.get(m.sample.remote())
    assert meter_lib.read_state(run_dir)["stopped"]
    # `mmray cost` of the stopped run: nothing alive, nothing burning (the last burn rate kept apart).
    summary = meter_lib.report(run_dir)
    assert summary["stopped"] and (summary["nodes_alive"], summary["burn_usd_per_hour"]) == (0, 0.0)
    assert summary["last_burn_usd_per_hour"] == status["burn_usd_per_hour"]
    assert summary["nodes_at_stop"] == status["nodes_alive"]
    _kill(ray, m, run_dir)


def test_a_new_meter_continues_the_total(ray_session, tmp_path, prices_file):
    """Kill the meter (a driver restart) and start another on the same run directory: the total goes on from the
    saved one; a node still alive is charged across the gap, one that left meanwhile is not."""
    ray = ray_session
    run_dir = str(tmp_path / "run")
    script = Script(tmp_path / "cluster.json")
    script.set(0, [_node("head", HEAD), _node("w1", SPOT)])
    first = _meter(ray, run_dir, prices_file, script)
    ray.get(first.sample.remote())
    script.set(3600, [_node("head", HEAD), _node("w1", SPOT)])
    assert ray.get(first.sample.remote())["spent_usd"] == pytest.approx(0.18 + 0.36)
    _kill(ray, first, run_dir)

    script.set(7200, [_node("head", HEAD), _node("w4", SPOT)])  # w1 left while nobody metered; w4 is new
    second = _meter(ray, run_dir, prices_file, script)
    status = ray.get(second.status.remote())
    assert status["spent_usd"] == pytest.approx(0.54) and status["restarts"] == 1  # restored, not reset
    status = ray.get(second.sample.remote())
    assert status["spent_usd"] == pytest.approx(0.54 + 0.18)  # the head across the gap; nothing for w1 or w4 yet
    script.set(9000, [_node("head", HEAD), _node("w4", SPOT)])
    status = ray.get(second.sample.remote())
    assert status["spent_usd"] == pytest.approx(0.54 + 0.18 + 0.5 * (0.18 + 0.36))
    state = meter_lib.read_state(run_dir)
    assert state["nodes"]["w1"]["usd"] == pytest.approx(0.36) and not state["nodes"]["w1"]["alive"]
    assert state["restarts"] == 1 and not state["stopped"]
    total = 0.54 + 0.18 + 0.27
    script.set(9000, [_node("head", HEAD), _node("w4", SPOT)])
    assert ray.get(second.stop.remote())["spent_usd"] == pytest.approx(total)  # a clean end (the run finished)
    _kill(ray, second, run_dir)
    assert meter_lib.report(run_dir, now=99999)["spent_usd_now"] == pytest.approx(total)  # nothing more after it

    # Rerun a day later on the same cluster: the idle day between the runs is not charged to the run.
    script.set(9000 + 86400, [_node("head", HEAD), _node("w4", SPOT)])
    third = _meter(ray, run_dir, prices_file, script)
    assert ray.get(third.sample.remote())["spent_usd"] == pytest.approx(total)
    script.set(9000 + 86400 + 1800, [_node("head", HEAD), _node("w4", SPOT)])
    assert ray.get(third.sample.remote())["spent_usd"] == pytest.approx(total + 0.5 * (0.18 + 0.36))
    assert meter_lib.read_state(run_dir)["restarts"] == 2
    _kill(ray, third, run_dir)


def test_cost_json_on_s3_and_plan_counts_s3_shards(s3_bucket, tmp_path, prices_file):
    """cost.json in an s3:// run directory (moto) is written and restored the same way; the planner counts the
    shards of an S3 data set and says "unknown" for an unreachable one instead of hanging."""
    from mmray import config
    from mmray.cost import planner
    from mmray.data.prepare import prepare_synthetic

    run_dir = f"s3://{s3_bucket}/runs/r1"
    now = {"t": 0.0}
    nodes = [_node("head", HEAD), _node("w1", SPOT)]
    m = meter_lib.CostMeter(run_dir, prices_path=prices_file, list_nodes=lambda: nodes, clock=lambda: now["t"])
    m.sample()
    now["t"] = 3600.0
    m.sample()
    again = meter_lib.CostMeter(run_dir, prices_path=prices_file, list_nodes=lambda: nodes, clock=lambda: now["t"])
    assert again.spent_usd() == pytest.approx(0.54) and meter_lib.report(run_dir)["restarts"] == 0

    data = f"s3://{s3_bucket}/data/shapes"
    prepare_synthetic(data, samples=50, seed=2, val_samples=10, samples_per_shard=20)
    vocab, shards, how = planner.data_facts(config.load(None, [f"data.source={data}"]))
    assert shards == 2 and "counted" in how
    vocab, shards, how = planner.data_facts(config.load(None, [f"data.source=s3://no-such-bucket-{s3_bucket}/x"]))
    assert shards is None and "not reachable" in how


def test_preemption_records_are_kept_merged_and_restored(tmp_path, prices_file, capsys):
    """The loop hands each preemption over twice (after the emergency checkpoint, then completed on resume): the
    meter keeps one record per notice, priced by the preempted node, through a meter restart, and `mmray cost`
    reports it."""
    from mmray.cli import main

    run_dir = str(tmp_path / "run")
    now = {"t": 0.0}
    nodes = [_node("head", HEAD), _node("w1", SPOT)]
    m = meter_lib.CostMeter(run_dir, prices_path=prices_file, list_nodes=lambda: nodes, clock=lambda: now["t"])
    m.sample()
    notice = {"notice_at": 100.0, "deadline_at": 220.0, "notice_s": 120.0, "nodes": ["w1"], "step": 40,
              "checkpoint": "step_000040_r", "checkpoint_done_at": 130.0, "before_deadline": True}
    m.record_preemption(notice)
    nodes[1]["alive"] = False
    now["t"] = 300.0
    m.sample()
    again = meter_lib.CostMeter(run_dir, prices_path=prices_file, list_nodes=lambda: nodes, clock=lambda: now["t"])
    again.record_preemption({**notice, "resumed_from_step": 40, "resumed_at": 400.0, "steps_lost": 0})
    (rec,) = meter_lib.read_state(run_dir)["preemptions"]
    assert rec["steps_lost"] == 0 and rec["before_deadline"] is True and rec["notice_s"] == 120.0
    assert rec["usd_per_hour"] == pytest.approx(0.36) and rec["markets"] == ["spot"]
    again.record_preemption({**notice, "notice_at": 900.0, "nodes": ["gone"]})  # a second notice, unknown node
    assert [p["usd_per_hour"] for p in again.preemptions()] == [pytest.approx(0.36), None]

    assert main(["cost", run_dir]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["notice_at"] for p in out["preemptions"]] == [100.0, 900.0]
    assert out["preemptions"][0]["steps_lost"] == 0
