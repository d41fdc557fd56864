"""`ray job submit` of the job entrypoints (jobs/train.py, jobs/embed.py, jobs/generate.py) to a real local cluster
started with `ray start --head`."""
import json
import os
import signal
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


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster on loopback with the dashboard's job server, token authentication on.

    `ray start --block` runs in the foreground of a child process, and stopping it (SIGTERM) stops this cluster
    only: `ray stop` would stop every Ray instance on the machine, a session's or a benchmark's included.
    """
    gcs, dash = _port(), _port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "mmray-test-token-0123456789abcdef",
           "DS_ACCELERATOR": "cpu",
           # The head needs no graceful drain on SIGTERM (default 30 s: waiting for work that has finished).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # The job server answers some time after the head starts; on a busy machine a submit can come too early
        # and fail in the client. Wait until it lists jobs.
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", f"--address={address}"], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None, f"`ray start --head --block` exited with {head.returncode}"
            assert time.monotonic() < deadline, "the Ray job server did not come up within 180 s"
            time.sleep(2)
        yield address, env
    finally:
        head.terminate()  # ray start --block stops the processes it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def _submit(address: str, env: dict, *entrypoint: str) -> dict:
    """`ray job submit` the entrypoint, wait for it, and return its JSON summary (the last stdout line that is one)."""
    for attempt in range(20):  # about a minute
        proc = subprocess.run([RAY, "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
                               "python", *entrypoint], env=env, capture_output=True, text=True, timeout=600)
        # The job server answers before its agent is ready to take a job ("please try again later"): retry that only.
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    return next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))


def test_submit_train_then_embed_and_generate_jobs(ray_head, tmp_path):
    """Train as a submitted job, export the run, then embed and caption a data set as submitted jobs."""
    import pyarrow.parquet as pq

    from mmray.data.prepare import prepare_synthetic
    from mmray.export import export

    address, env = ray_head
    runs = tmp_path / "runs"
    summary = _submit(address, env, "jobs/train.py", "--config", "jobs/configs/ci-tiny.yaml", "train.max_steps=6",
                      "train.warmup_steps=2", "train.checkpoint_every=3", "train.log_every=3",
                      "data.synthetic_samples=1000", f"data.cache_dir={tmp_path}/cache", f"run.storage_path={runs}",
                      "model.decoder_depth=1", "model.caption_weight=1", "run.name=submitted")
    assert summary["steps"] == 6 and summary["samples_seen"] == 6 * 128
    assert summary["ray"] == "joined"  # the job joined the running cluster (RAY_ADDRESS) rather than starting one
    assert (runs / "submitted" / "checkpoint_00000006" / "state.json").exists()

    exported = str(tmp_path / "export")
    export(str(runs / "submitted"), exported)
    data = str(tmp_path / "data")
    prepare_synthetic(data, samples=48, seed=5, val_samples=8, samples_per_shard=20)
    emb = _submit(address, env, "jobs/embed.py", exported, data, str(tmp_path / "emb"), "--actors", "1")
    assert emb["samples"] == 48 and emb["shards_written"] == 3 and sum(emb["bad"].values()) == 0
    rows = [r for f in sorted((tmp_path / "emb").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 48 and len(rows[0]["image_embedding"]) == len(rows[0]["text_embedding"]) > 0

    gen = _submit(address, env, "jobs/generate.py", exported, data, str(tmp_path / "gen"), "--task", "caption",
                  "--format", "jsonl", "--actors", "1")
    lines = [json.loads(line) for f in sorted((tmp_path / "gen").rglob("*.jsonl")) for line in f.read_text().splitlines()]
    assert gen["rows"] == len(lines) == 48 and all(isinstance(r["generated"], str) for r in lines)


def test_submit_without_token_is_refused(ray_head):
    address, env = ray_head
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/token"
    proc = subprocess.run([RAY, "job", "list", f"--address={address}"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()
