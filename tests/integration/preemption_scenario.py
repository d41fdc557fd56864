"""Run by test_preemption_e2e.py in a process of its own (a multi-raylet cluster cannot share the test process with
the session's Ray): the whole preemption path, from a cloud's interruption notice to the resumed, finished run.

- A CPU-less head (the driver and the Train controller) and a "spot" worker raylet labelled as spot, the only node
  with CPUs, so the training worker starts there.
- The real watcher, ``python -m mmray.node.spot``, polls the fake IMDSv2 server of the unit tests for that node.
- Once training has written its first periodic checkpoint, the fake server announces an interruption NOTICE_S ahead;
  the watcher drains the spot node; Ray Train hands the deadline to the loop, which takes an emergency checkpoint.
- An on-demand raylet joins (the fallback capacity), and at the deadline the spot node is killed
  (``Cluster.remove_node``). Ray Train restarts the run, on the on-demand node, from the emergency checkpoint.

With ``--no-notice`` the cloud gives no warning: once the first periodic checkpoint is on storage and the run has
trained past it, the on-demand raylet joins and the spot node is killed outright (SIGKILL). Ray Train counts that as
a failure (``train.max_failures=1``) and restarts the run on the on-demand node from its latest checkpoint. Both
scenarios train the same config on the same data, so the test compares their final weights.

Usage: ``python preemption_scenario.py WORKDIR [--no-notice]``. Prints one JSON line of findings (the last line of
stdout).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(REPO / "tests" / "unit")]

# Before any raylet starts: the raylets' workers (the Train controller among them) inherit these.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray Train's drain poll (default 5 s)
# The Train controller's poll of its workers (default 2 s). Each ray.train.report() waits for the previous one to be
# consumed by such a poll, so with train.log_every=1 this is also the floor of a step's time: 0.5 s steps leave the
# notice time to arrive mid-run even on an idle machine, and the restart after the deadline starts sooner.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"

from test_spot_watch import FakeMetadata  # noqa: E402  (the IMDSv2 fake, shared with the unit tests)
from tiny_config import tiny_cfg  # noqa: E402

NOTICE_S = 10  # the interruption is announced this many seconds ahead (AWS: 120)
# The notice goes out when the first periodic checkpoint (step 3) is on storage; the 9 steps left (0.5 s or more
# each, see RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) leave it time to reach the loop mid-run (1-2 s).
MAX_STEPS, CHECKPOINT_EVERY, WORKERS, MICRO = 12, 3, 1, 16
INSTANCE = "g5.xlarge"
SPOT_USD_H, ON_DEMAND_USD_H = 36.0, 72.0  # round figures: a cent / two cents a second
METER_INTERVAL_S = 0.5
SPOT_LABELS = {"mmray/instance-type": INSTANCE, "ray.io/market-type": "spot"}
ON_DEMAND_LABELS = {"mmray/instance-type": INSTANCE, "ray.io/market-type": "on-demand"}


def _mtime_max(directory: Path) -> float:
    return max(p.stat().st_mtime for p in directory.rglob("*") if p.is_file())


def checkpoints_on_storage(run_dir: Path) -> dict:
    """Every complete-looking checkpoint of the run: its loop state and when its files were last written."""
    found = {}
    for c in sorted(run_dir.glob("checkpoint_*")):
        try:
            found[c.name] = {"state": json.loads((c / "state.json").read_text()), "mtime": _mtime_max(c)}
        except (OSError, ValueError):  # being written or deleted right now
            pass
    return found


def worker_nodes(session_dir: Path) -> dict[str, str]:
    """Which node (id) started each Ray worker process (pid), from the raylets' logs."""
    nodes = {}
    for f in (session_dir / "logs").glob("raylet*.out"):
        text = f.read_text(errors="replace")
        node = re.search(r"Setting node ID node_id=([0-9a-f]+)", text)
        for pid in re.findall(r"Started worker process with pid (\d+)", text):
            nodes[pid] = node.group(1) if node else "?"
    return nodes


def loop_logs(session_dir: Path) -> dict[str, list[str]]:
    """The training loop's own lines ("[mmray] ...") from each Ray worker process's log file, keyed by pid."""
    logs = {}
    for f in sorted((session_dir / "logs").glob("worker-*.err")):
        lines = [line.split("[mmray] ", 1)[1] for line in f.read_text(errors="replace").splitlines()
                 if "[mmray] " in line]
        if lines:
            logs[f.name.rsplit("-", 1)[-1].removesuffix(".err")] = lines
    return logs


class Cloud:
    """Plays the cloud, in the main thread (Ray starts and stops raylets only from there): announces the interruption
    once training has checkpointed, adds the on-demand fallback node once the spot node drains, and takes the spot
    node away at the deadline."""

    def __init__(self, cluster, spot, imds: FakeMetadata, run_dir: Path, found: dict, t0: float, training,
                 session_dir: Path):
        self.cluster, self.spot, self.imds, self.run_dir, self.found, self.t0 = cluster, spot, imds, run_dir, found, t0
        self.training = training  # the thread that trains: waiting stops early if it ends
        self.session_dir = session_dir

    def _at(self, key: str) -> float:
        now = time.time()
        self.found[key] = round(now, 3)
        self.found.setdefault("timeline", {})[key] = round(time.monotonic() - self.t0, 1)
        return now

    def _wait(self, done, what: str, until: float) -> None:
        while not done():
            if not self.training.is_alive():
                raise RuntimeError(f"training ended while waiting for {what}")
            if time.time() > until:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def _trained_steps(self) -> int:
        return max([int(m.group(1)) for lines in loop_logs(self.session_dir).values() for line in lines
                    if (m := re.match(r"step=(\d+) ", line))] or [0])

    def kill_without_notice(self) -> None:
        """No warning: once the first periodic checkpoint is on storage and the run has trained a step past a
        checkpoint, the spot node dies (SIGKILL). The on-demand node joins once training is under way on the spot
        node (earlier, the workers could be placed on it), before the wait for that step, so that the kill follows
        the step as closely as it can."""
        first = self.run_dir / f"checkpoint_{CHECKPOINT_EVERY:08d}" / "state.json"
        self._wait(first.exists, f"the first periodic checkpoint {first}", time.time() + 240)
        self._at("on_demand_adding_at")
        on_demand = self.cluster.add_node(num_cpus=WORKERS + 1, labels=ON_DEMAND_LABELS)
        self.found["on_demand_id"] = on_demand.node_id
        self._wait(lambda: self._trained_steps() % CHECKPOINT_EVERY != 0, "a step past a checkpoint",
                   time.time() + 120)
        # A vanished instance stops every process on it at once. `remove_node` SIGKILLs the raylet, but the workers it
        # started notice only later and could finish a checkpoint meanwhile: freeze them first, so that what is on
        # storage now is what the run will find.
        workers = psutil.Process(self.spot.all_processes["raylet"][0].process.pid).children(recursive=True)
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
        self._at("kill_at")
        self.found["at_kill"] = checkpoints_on_storage(self.run_dir)
        self.cluster.remove_node(self.spot, allow_graceful=False)
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self._at("removed_at")
        self._wait_dead()

    def play(self) -> None:
        from ray._raylet import GcsClient

        first = self.run_dir / f"checkpoint_{CHECKPOINT_EVERY:08d}" / "state.json"
        self._wait(first.exists, f"the first periodic checkpoint {first}", time.time() + 240)
        deadline = int(time.time()) + NOTICE_S  # AWS gives whole seconds
        self.imds.notice("terminate", at=deadline)
        self._at("notice_at")
        self.found["deadline_at"] = float(deadline)

        client = GcsClient(address=self.cluster.address)
        self._wait(lambda: self.spot.node_id in client.get_draining_nodes(), "the watcher's drain", deadline)
        self._at("drained_at")
        self.found["drain_deadline_ms"] = client.get_draining_nodes()[self.spot.node_id]

        self._at("on_demand_adding_at")
        on_demand = self.cluster.add_node(num_cpus=WORKERS + 1, labels=ON_DEMAND_LABELS)
        self.found["on_demand_id"] = on_demand.node_id
        self._at("on_demand_added_at")

        time.sleep(max(0.0, deadline - time.time()))
        self._at("kill_at")
        self.found["at_kill"] = checkpoints_on_storage(self.run_dir)  # retention deletes the emergency one later
        self.cluster.remove_node(self.spot)  # the instance shuts down (SIGTERM first, as an EC2 termination does)
        self._at("removed_at")
        self._wait_dead()

    def _wait_dead(self) -> None:
        """Until the GCS marks the spot node dead: when the cluster stops counting it (nor the meter charging it)."""
        import ray
        from ray._raylet import GcsClient
        from ray.core.generated import common_pb2, gcs_pb2

        client = GcsClient(address=self.cluster.address)
        node = ray.NodeID.from_hex(self.spot.node_id)
        info = client.get_all_node_info(timeout=10)[node]
        until = time.time() + 60
        while info.state != gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD and time.time() < until:
            time.sleep(0.1)
            info = client.get_all_node_info(timeout=10)[node]
        self._at("spot_dead_at")
        self.found["spot_state"] = gcs_pb2.GcsNodeInfo.GcsNodeState.Name(info.state)
        self.found["spot_death_reason"] = common_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason)


def main(workdir: Path, notice: bool = True) -> dict:
    if not notice:  # a node killed outright is found dead by the GCS's health checks (default: 3 s x 5 misses)
        os.environ["RAY_health_check_period_ms"] = "500"
        os.environ["RAY_health_check_failure_threshold"] = "4"
    from ray.cluster_utils import Cluster

    from mmray.data.prepare import prepare_synthetic
    from mmray.train.trainer import train

    t0 = time.monotonic()
    found: dict = {"notice_s": NOTICE_S, "max_steps": MAX_STEPS, "global_batch": WORKERS * MICRO,
                   "prices": {"spot": SPOT_USD_H, "on_demand": ON_DEMAND_USD_H}}
    data = workdir / "shapes"
    t_data = time.monotonic()
    prepare_synthetic(str(data), samples=256, seed=3, val_samples=64, samples_per_shard=128)
    found["data_s"] = round(time.monotonic() - t_data, 1)
    prices = workdir / "prices.yaml"
    prices.write_text(f"instances:\n  {INSTANCE}: {{on_demand_usd_per_hour: {ON_DEMAND_USD_H}, "
                      f"spot_usd_per_hour: {SPOT_USD_H}}}\n")
    overrides = (f"train.num_workers={WORKERS}", f"train.micro_batch_size={MICRO}", f"train.max_steps={MAX_STEPS}",
                 "train.log_every=1", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_preemption_failures=1",
                 "eval.max_samples=32", f"budget.prices={prices}", f"budget.meter_interval_s={METER_INTERVAL_S}")
    cfg = tiny_cfg(str(data), str(workdir / "runs"), *overrides, "run.name=spot",
                   f"train.max_failures={0 if notice else 1}")
    run_dir = workdir / "runs" / "spot"
    found["zero_stage"] = cfg.train.zero_stage  # for the test, which consolidates the final weights

    # The head serves the state API (its dashboard) that each run's placement-group cleaner asks from the workers,
    # as mmray's own local Ray does (mmray.train.trainer.start_local_ray): without it, the cleaner's queries wait
    # on retries and each run ends seconds late.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # before the raylets start: they pass it on
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": port})
    imds = FakeMetadata()
    watcher = None
    try:
        found["spot_added_at"] = round(time.time(), 3)
        spot = cluster.add_node(num_cpus=WORKERS + 1, labels=SPOT_LABELS)
        cluster.wait_for_nodes()
        found.update(spot_id=spot.node_id, head_id=cluster.head_node.node_id,
                     cluster_up_s=round(time.monotonic() - t0, 1), notice=notice)
        session_dir = Path(cluster.head_node.get_session_dir_path())
        # The node-side watcher, as ray-cluster.yaml starts it on a spot worker (here told which raylet is its own).
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        watcher = subprocess.Popen(
            [sys.executable, "-m", "mmray.node.spot", "--endpoint", imds.url, "--interval", "0.25",
             "--ray-address", cluster.address, "--node-id", spot.node_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)

        result: dict = {}

        def training() -> None:
            try:
                result["summary"] = train(cfg)
            except BaseException:
                result["error"] = traceback.format_exc()

        os.environ["RAY_ADDRESS"] = cluster.address  # train() joins this cluster, as under `ray job submit`
        trainer = threading.Thread(target=training, name="training", daemon=True)
        trainer.start()
        try:
            cloud = Cloud(cluster, spot, imds, run_dir, found, t0, trainer, session_dir)
            cloud.play() if notice else cloud.kill_without_notice()
        except Exception:
            found["cloud_error"] = traceback.format_exc()
        trainer.join(timeout=300)
        os.environ.pop("RAY_ADDRESS", None)
        found["train_done_s"] = round(time.monotonic() - t0, 1)
        found["train_error"] = result.get("error")
        found["summary"] = result.get("summary")

        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=30)
        found["watcher_rc"] = watcher.returncode
        found["watcher_log"] = err[-3000:]
        found["watcher_summary"] = json.loads(out.strip().splitlines()[-1])
        watcher = None
        found["imds_hits"] = len(imds.hits)

        # What storage holds: every checkpoint's state and when its files were last written.
        found["checkpoints"] = checkpoints_on_storage(run_dir)
        found["cost"] = json.loads((run_dir / "cost.json").read_text())
        found["loop_logs"] = loop_logs(session_dir)
        found["worker_nodes"] = worker_nodes(session_dir)
    finally:
        if watcher is not None:
            watcher.kill()
        imds.shutdown()
        cluster.shutdown()
    found["total_s"] = round(time.monotonic() - t0, 1)
    return found


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), notice="--no-notice" not in sys.argv[2:])), flush=True)
