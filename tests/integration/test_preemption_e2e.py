"""The whole preemption path, end to end: a spot interruption notice becomes a Ray drain, an emergency checkpoint taken
before the deadline, a restart on another node that loses no step, and a cost meter that charged the spot node only
while it was up.

The scenario (tests/integration/preemption_scenario.py) runs in a subprocess, since a multi-raylet
`ray.cluster_utils.Cluster` cannot share this process with the session's Ray: a CPU-less head, a "spot" worker raylet
(labels `ray.io/market-type=spot`, `mmray/instance-type=g5.xlarge`) that is the only node with CPUs, the real
watcher (`python -m mmray.node.spot`) polling the fake IMDSv2 server of the unit tests, and a 1-worker DeepSpeed run
of mmray's trainer. Once the run has written its first checkpoint, the fake server announces an interruption 10 s
ahead; an on-demand raylet joins; at the deadline the spot node is removed. The same scenario with ``--no-notice``
kills the spot node outright, a step or more past a checkpoint. Both train the same config on the same data, so each
interrupted run must end with the other's weights, bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("preemption_scenario.py")


def _start(workdir: Path, ray_tmp: str, *flags: str) -> subprocess.Popen:
    # Each cluster gets its own Ray temp dir, so its own `ray_current_cluster` file: the processes of a cluster find
    # the GCS from it (Ray Train's state actor does, through the state API), and with one shared file, two clusters
    # at once would point one cluster's actors at the other's GCS.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    # Output to files, not pipes: this process waits on one scenario at a time, and the other must never stall
    # on a full pipe (its run's logs reach its driver's stdout and stderr) while its cluster keeps going.
    with open(workdir / "scenario.out", "w") as out, open(workdir / "scenario.err", "w") as err:
        return subprocess.Popen([sys.executable, str(SCENARIO), str(workdir), *flags], stdout=out, stderr=err,
                                text=True, env=env, cwd=REPO)


def _result(proc: subprocess.Popen) -> dict:
    try:
        proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    workdir = Path(proc.args[2])
    out, err = (workdir / "scenario.out").read_text(), (workdir / "scenario.err").read_text()
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    result = json.loads(out.strip().splitlines()[-1])
    problems = {k: result.get(k) for k in ("cloud_error", "train_error") if result.get(k)}
    assert not problems, "\n".join(f"{k}:\n{v}" for k, v in problems.items()) + err[-4000:]
    return result


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Both scenarios, run at the same time: each is its own Ray cluster in its own process, and much of each is
    waiting (the notice's 10 s, health checks, restarts), so together they take ~105 s instead of ~130 s. Each
    one's failure is its own tests' error."""
    # Short paths: Ray's unix sockets live under the temp dir, and a socket path may not exceed 107 bytes.
    ray_tmps = [tempfile.mkdtemp(prefix="mmray-ray-", dir="/tmp") for _ in range(2)]
    procs = {"found": _start(tmp_path_factory.mktemp("preemption"), ray_tmps[0]),
             "killed": _start(tmp_path_factory.mktemp("killed"), ray_tmps[1], "--no-notice")}
    results: dict = {}
    try:
        for name, proc in procs.items():
            try:
                results[name] = _result(proc)
            except AssertionError as e:
                results[name] = e
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in ray_tmps:
            shutil.rmtree(path, ignore_errors=True)
    return results


def _outcome(result: dict | AssertionError) -> dict:
    if isinstance(result, AssertionError):
        raise result
    return result


@pytest.fixture(scope="module")
def found(scenarios):
    return _outcome(scenarios["found"])


@pytest.fixture(scope="module")
def killed(scenarios):
    return _outcome(scenarios["killed"])


@pytest.fixture(scope="module")
def weights_killed_vs_found(found, killed):
    """The two runs' final weights (consolidated fp32, from their final checkpoints), compared: the parameter names
    each has alone, and the largest absolute difference of any element (0.0: bit-identical)."""
    from mmray.export import consolidate

    a = consolidate(killed["summary"]["checkpoint"], found["zero_stage"])
    b = consolidate(found["summary"]["checkpoint"], found["zero_stage"])
    return {"only_in_killed": sorted(set(a) - set(b)), "only_in_found": sorted(set(b) - set(a)),
            "elements": sum(t.numel() for t in a.values()),
            "max_abs_diff": max(float((a[k] - b[k]).detach().abs().max()) for k in set(a) & set(b))}


def _steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"step=(\d+) ", line))]


def _losses(logs: dict[str, list[str]]) -> dict[int, str]:
    """The loss the loop logged at each step (every step: train.log_every=1), over all of a run's attempts; a step
    trained twice (before a kill and again after the resume) must have logged the same loss both times."""
    losses: dict[int, set[str]] = {}
    for lines in logs.values():
        for line in lines:
            if m := re.match(r"step=(\d+) .*\bloss=(\S+)", line):
                losses.setdefault(int(m.group(1)), set()).add(m.group(2))
    assert all(len(v) == 1 for v in losses.values()), losses
    return {step: v.pop() for step, v in sorted(losses.items())}


def test_spot_notice_to_resumed_run_loses_no_step(found):
    spot, deadline = found["spot_id"], found["deadline_at"]

    # The watcher saw the notice through IMDSv2 and drained the spot node with the notice's deadline, once.
    drains = found["watcher_summary"]["drains"]
    assert found["watcher_rc"] == 0 and len(drains) == 1, found["watcher_log"]
    assert drains[0]["node_id"] == spot and found["drain_deadline_ms"] == deadline * 1000

    # The run finished with exactly the samples of an uninterrupted run, resuming from the emergency checkpoint.
    summary, metrics = found["summary"], found["summary"]["metrics"]
    assert summary["steps"] == found["max_steps"]
    assert summary["samples_seen"] == found["max_steps"] * found["global_batch"]
    assert metrics["emergency_checkpoints"] == 1
    (record,) = metrics["preemptions"]
    emergency = record["checkpoint"]
    assert metrics["restored_from"] == emergency and metrics["resumed_from_step"] == record["step"]

    # The training summary records the preemption: when the loop saw it, the notice left, the checkpoint on time.
    assert record["nodes"] == [spot] and record["deadline_at"] == deadline
    assert found["notice_at"] <= record["notice_at"] < deadline
    assert 0 < record["notice_s"] <= found["notice_s"]
    assert record["before_deadline"] is True and record["checkpoint_done_at"] <= deadline
    assert record["resumed_from_step"] == record["step"] and record["steps_lost"] == 0
    assert found["removed_at"] < record["resumed_at"]

    # Storage agrees: at the deadline the emergency checkpoint was complete, written before it, holding the record.
    at_kill = found["at_kill"][emergency]
    assert at_kill["mtime"] <= deadline <= found["kill_at"]
    assert at_kill["state"]["step"] == record["step"] and at_kill["state"]["emergency_checkpoints"] == 1
    assert at_kill["state"]["preemptions"][0]["notice_at"] == record["notice_at"]

    # The loop's logs: the spot attempt trained no step past its emergency checkpoint (nothing to lose), and the
    # attempt on the on-demand node went on from the next step.
    logs = found["loop_logs"]
    (before,) = [pid for pid, lines in logs.items() if any(line.startswith("PREEMPTION NOTICE") for line in lines)]
    (after,) = [pid for pid, lines in logs.items() if any(line.startswith("resumed at step") for line in lines)]
    assert max(_steps(logs[before])) == record["step"]
    assert any(line.startswith("waiting for the restart") for line in logs[before])
    assert _steps(logs[after]) == list(range(record["step"] + 1, found["max_steps"] + 1))

    # The first attempt trained on the spot node, the resumed one on the on-demand node; the spot node went as a
    # preemption (Ray's record of the drain).
    assert found["worker_nodes"][before] == spot and found["worker_nodes"][after] == found["on_demand_id"]
    assert found["spot_death_reason"] == "AUTOSCALER_DRAIN_PREEMPTED"


def test_cost_meter_charges_the_spot_node_only_while_it_was_up(found):
    cost, prices = found["cost"], found["prices"]
    interval = cost["interval_s"]
    nodes = cost["nodes"]
    spot, on_demand = nodes[found["spot_id"]], nodes[found["on_demand_id"]]
    assert (spot["market"], spot["usd_per_hour"]) == ("spot", prices["spot"])
    assert (on_demand["market"], on_demand["usd_per_hour"]) == ("on-demand", prices["on_demand"])
    assert nodes[found["head_id"]]["usd"] == 0.0  # unlabelled: the local entry, $0

    # Charged from when the meter first saw it to about when it went (the meter samples every interval: a node is
    # charged up to the sample that finds it gone, or, when the meter itself was restarted, its last saved sample).
    assert found["spot_added_at"] <= spot["first_seen"] and not spot["alive"]
    assert found["kill_at"] - 2 * interval - 0.5 <= spot["charged_until"] <= found["spot_dead_at"] + interval + 0.5
    assert spot["usd"] == pytest.approx(prices["spot"] * (spot["charged_until"] - spot["first_seen"]) / 3600,
                                        rel=1e-6)
    # The on-demand node was charged from when it joined, and the total is the sum of the nodes.
    assert on_demand["first_seen"] >= found["on_demand_adding_at"] and on_demand["usd"] > 0
    assert cost["spent_usd"] == pytest.approx(sum(n["usd"] for n in nodes.values()), rel=1e-9)
    assert found["summary"]["spent_usd"] == pytest.approx(cost["spent_usd"], abs=1e-5)

    # The meter keeps the preemption too: the loop's record, completed on resume, priced at the spot node's rate.
    (record,) = found["summary"]["metrics"]["preemptions"]
    (kept,) = cost["preemptions"]
    assert {k: kept[k] for k in record} == record
    assert kept["steps_lost"] == 0 and kept["before_deadline"] is True
    assert kept["usd_per_hour"] == pytest.approx(prices["spot"]) and kept["markets"] == ["spot"]


def test_a_node_killed_without_notice_costs_at_most_one_checkpoint_interval(killed, found, weights_killed_vs_found):
    summary, metrics = killed["summary"], killed["summary"]["metrics"]
    every = 3  # preemption_scenario.CHECKPOINT_EVERY
    # Finished with exactly the samples of an uninterrupted run, with no notice recorded and no emergency checkpoint.
    assert summary["steps"] == killed["max_steps"]
    assert summary["samples_seen"] == killed["max_steps"] * killed["global_batch"]
    assert metrics["preemptions"] == [] and metrics["emergency_checkpoints"] == 0
    assert killed["spot_death_reason"] == "UNEXPECTED_TERMINATION"

    # Resumed, on the on-demand node, from a periodic checkpoint that was complete on storage at the kill.
    resumed = metrics["resumed_from_step"]
    assert metrics["restored_from"] in killed["at_kill"] and resumed >= every and resumed % every == 0
    assert killed["at_kill"][metrics["restored_from"]]["state"]["step"] == resumed
    logs = killed["loop_logs"]
    (before,) = [pid for pid, lines in logs.items() if not any(line.startswith("resumed at step") for line in lines)
                 and _steps(lines)]
    (after,) = [pid for pid, lines in logs.items() if any(line.startswith("resumed at step") for line in lines)]
    assert killed["worker_nodes"][before] == killed["spot_id"]
    assert killed["worker_nodes"][after] == killed["on_demand_id"]
    # The steps trained on the spot node past that checkpoint are lost: at most one checkpoint interval.
    lost = max(_steps(logs[before])) - resumed
    assert 0 <= lost <= every
    assert _steps(logs[after]) == list(range(resumed + 1, killed["max_steps"] + 1))

    # The killed and resumed run ends with the weights of the run that resumed from an emergency checkpoint (the
    # notice scenario, same config and data), bit for bit, after the same samples, none repeated: the data order is a
    # function of (seed, epoch) that either resume keeps, and each step logged the same loss in both runs.
    assert summary["samples_seen"] == found["summary"]["samples_seen"] == killed["max_steps"] * killed["global_batch"]
    assert summary["samples_repeated"] == found["summary"]["samples_repeated"] == 0
    weights = weights_killed_vs_found
    assert weights["only_in_killed"] == weights["only_in_found"] == [] and weights["elements"] > 100_000
    assert weights["max_abs_diff"] <= 1e-6, weights
    assert _losses(logs) == _losses(found["loop_logs"])
    assert list(_losses(logs)) == list(range(1, killed["max_steps"] + 1))

    # The meter charged the spot node until about when the cluster found it dead, and the on-demand node after.
    cost, prices = killed["cost"], killed["prices"]
    interval = cost["interval_s"]
    spot, on_demand = cost["nodes"][killed["spot_id"]], cost["nodes"][killed["on_demand_id"]]
    assert not spot["alive"] and killed["kill_at"] - 0.5 <= spot["charged_until"]
    assert spot["charged_until"] <= killed["spot_dead_at"] + interval + 0.5
    assert spot["usd"] == pytest.approx(prices["spot"] * (spot["charged_until"] - spot["first_seen"]) / 3600,
                                        rel=1e-6)
    assert on_demand["first_seen"] >= killed["on_demand_adding_at"] and on_demand["usd"] > 0
    assert cost["spent_usd"] == pytest.approx(sum(n["usd"] for n in cost["nodes"].values()), rel=1e-9)
