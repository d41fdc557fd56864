"""The spot watcher drains a REAL Ray worker node: reason preemption, the notice's deadline, visible in the GCS.

The scenario (tests/integration/spot_drain_scenario.py) runs in a subprocess: it starts a two-raylet
`ray.cluster_utils.Cluster` (a CPU-less head and a "spot" worker), which cannot share this process with the
session-scoped Ray that other tests use (one Ray per process). The watcher itself runs as the cluster's start
commands run it, `python -m mmray.node.spot`, against the fake IMDSv2 server of the unit tests. About 15 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("spot_drain_scenario.py")


def test_watcher_drains_the_worker_node_with_the_notice_deadline():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    worker, head = found["worker_id"], found["head_id"]

    # The watcher read the notice through IMDSv2 (token first) and drained the worker node once.
    assert found["watcher_rc"] == 0, found["watcher_log"]
    assert found["imds_hits"][0] == ["PUT", "/latest/api/token", 200]
    drains = found["watcher_summary"]["drains"]
    assert len(drains) == 1 and drains[0]["node_id"] == worker and drains[0]["action"] == "terminate"

    # Ray's view: only the worker is draining, with the notice's time as its deadline (what Train V2 reads).
    assert set(found["draining"]) == {worker}
    assert abs(found["draining"][worker] - found["notice_ms"]) <= 1000
    assert found["worker_state"] == "DRAINING" and found["head_state"] != "DRAINING"

    # Once its work is gone the drained node leaves, and Ray records it as a preemption with our message.
    assert found["worker_final"] == "DEAD"
    assert found["death_reason"] == "AUTOSCALER_DRAIN_PREEMPTED"
    assert found["death_message"].startswith("mmray spot watcher: aws-instance-action terminate")

    # With two raylets on one machine the watcher refuses to guess which node is its own.
    assert "found 2" in found["auto_node"] and worker in found["auto_node"] and head in found["auto_node"]
