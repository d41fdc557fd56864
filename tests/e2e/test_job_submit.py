"""`ray job submit` of jobs/train.py to a real local cluster started with `ray start --head`."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RAY = str(Path(sys.executable).with_name("ray"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A one-node cluster on loopback with the dashboard's job server, token authentication on."""
    gcs, dash = _port(), _port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "mmray-test-token-0123456789abcdef",
           "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dash}"
    try:
        # `ray start` returns before the dashboard's job server answers; on a busy machine a submit can come too
        # early and fail in the client. Wait until it lists jobs.
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", f"--address={address}"], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert time.monotonic() < deadline, "the Ray job server did not come up within 120 s"
            time.sleep(2)
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_train_job(ray_head, tmp_path):
    address, env = ray_head
    runs = tmp_path / "runs"
    for attempt in range(5):
        proc = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
             "python", "jobs/train.py", "--config", "jobs/configs/ci-tiny.yaml", "train.max_steps=6",
             "train.warmup_steps=2", "train.checkpoint_every=3", "train.log_every=3", "data.synthetic_samples=1000",
             f"data.cache_dir={tmp_path}/cache", f"run.storage_path={runs}", "run.name=submitted"],
            env=env, capture_output=True, text=True, timeout=600)
        # The job server answers before its agent is ready to take a job ("please try again later"): retry that only.
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    summary = next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith('{"run_dir"'))
    assert summary["steps"] == 6 and summary["samples_seen"] == 6 * 128
    assert summary["ray"] == "joined"  # the job joined the running cluster (RAY_ADDRESS) rather than starting one
    assert (runs / "submitted" / "checkpoint_00000006" / "state.json").exists()


def test_submit_without_token_is_refused(ray_head):
    address, env = ray_head
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/token"
    proc = subprocess.run([RAY, "job", "list", f"--address={address}"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()
