"""Run by test_spot_drain.py in a process of its own (a second Ray cluster in the test process would clash with the
session's Ray): a real two-raylet cluster, the fake IMDSv2 server of the unit tests announcing an interruption, and
the real watcher (`python -m mmray.node.spot --once`) draining the worker node. Prints one JSON line of findings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from test_spot_watch import FakeMetadata  # noqa: E402  (the IMDSv2 fake, shared with the unit tests)

NOTICE_S = 20  # the interruption is announced for 20 s from now


def _node(client, node_id: str):
    import ray

    return client.get_all_node_info(timeout=10)[ray.NodeID.from_hex(node_id)]


def _wait_for_node(client, node_id: str, done, interval_s: float, timeout_s: float = 30):
    """The node's info once ``done(info)`` holds, or as it is after ``timeout_s``; and the seconds waited."""
    started = time.monotonic()
    info = _node(client, node_id)
    while not done(info) and time.monotonic() - started < timeout_s:
        time.sleep(interval_s)
        info = _node(client, node_id)
    return info, time.monotonic() - started


def main() -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import common_pb2, gcs_pb2

    from mmray.node.spot import DrainFailed, RayDrainer

    found: dict = {}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    imds = FakeMetadata()
    try:
        worker = cluster.add_node(num_cpus=1, resources={"spot": 1})
        cluster.wait_for_nodes()
        head_id = cluster.head_node.node_id
        found.update(worker_id=worker.node_id, head_id=head_id, cluster_up_s=round(time.monotonic() - started, 1))
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)

        # Two raylets on one machine: finding "this machine's" node must refuse to guess.
        try:
            RayDrainer(address=cluster.address).prepare()
            found["auto_node"] = "resolved"
        except DrainFailed as e:
            found["auto_node"] = str(e)

        # Work on the worker node keeps it up after the drain (a drained, idle raylet exits by itself).
        @ray.remote(num_cpus=0, resources={"spot": 0.01})
        class Work:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        work = Work.remote()
        found["work_node"] = ray.get(work.node.remote())

        notice_at = int(time.time()) + NOTICE_S
        imds.notice("terminate", at=notice_at)
        found["notice_ms"] = notice_at * 1000
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(
            [sys.executable, "-m", "mmray.node.spot", "--endpoint", imds.url, "--once",
             "--ray-address", cluster.address, "--node-id", worker.node_id],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        found["watcher_rc"] = proc.returncode
        found["watcher_log"] = proc.stderr[-3000:]
        found["watcher_summary"] = json.loads(proc.stdout.strip().splitlines()[-1])

        client = ray._raylet.GcsClient(address=cluster.address)
        found["draining"] = client.get_draining_nodes()  # {node id hex: deadline ms}
        # The node's state snapshot is not the drain table: the GCS takes it from the raylet's next resource-view
        # report, which lags the drain by a report period, longer on a loaded machine (one CI run read ACTIVE).
        info, waited = _wait_for_node(
            client, worker.node_id, lambda i: i.state_snapshot.state == gcs_pb2.NodeSnapshot.State.DRAINING, 0.1)
        found["worker_state"] = gcs_pb2.NodeSnapshot.State.Name(info.state_snapshot.state)
        found["worker_state_after_s"] = round(waited, 2)
        found["head_state"] = gcs_pb2.NodeSnapshot.State.Name(_node(client, head_id).state_snapshot.state)
        found["imds_hits"] = [list(h) for h in imds.hits]

        # The work ends: the drained node goes away, and Ray records why.
        ray.kill(work)
        info, _ = _wait_for_node(
            client, worker.node_id, lambda i: i.state == gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD, 0.2)
        found["worker_final"] = gcs_pb2.GcsNodeInfo.GcsNodeState.Name(info.state)
        found["death_reason"] = common_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason)
        found["death_message"] = info.death_info.reason_message
    finally:
        imds.shutdown()
        ray.shutdown()
        cluster.shutdown()
    found["total_s"] = round(time.monotonic() - started, 1)
    return found


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
