"""Checkpoints written to s3:// through a proxy that answers 503 SlowDown and drops connections: the S3 client's
retries (mmray.storage's AwsStandardS3RetryStrategy) absorb the faults and the checkpoint arrives whole and
byte-identical; when the endpoint keeps failing, the write fails naming the destination, and nothing that reached
storage passes as a complete checkpoint.

The upload is Ray Train's own (StorageContext.persist_current_checkpoint, what every worker's report() runs), through
mmray's wrapper (checkpoint.persist) and the S3 filesystem that mmray gives Ray Train; no training run is needed.
"""
import hashlib
import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.train
from ray.train.v2._internal.execution.storage import StorageContext

from mmray import storage
from mmray.train.checkpoint import (STATE_FILE, CheckpointWriteError, IncompleteCheckpoint, latest_complete, persist,
                                    verify, write_manifest)
from tests.s3_faults import FaultyS3Proxy

RUN = "run"


def _local_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as one rank writes it: a shard big enough for a multipart upload, small files, the manifest."""
    d = root / f"local-{step}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(6 << 20))
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
    (d / STATE_FILE).write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(str(d), 0, 1, step)
    return d


def _context(bucket: str, endpoint: str, max_attempts: int | None = None) -> StorageContext:
    """Ray Train's storage for a run in ``bucket``, with mmray's S3 filesystem (or one that gives up sooner)."""
    fs, path = storage.resolve(f"s3://{bucket}", endpoint_url=endpoint)
    if max_attempts is not None:
        fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
    return StorageContext(storage_path=path, experiment_dir_name=RUN, storage_filesystem=fs)


def test_checkpoint_upload_survives_slowdowns_and_dropped_connections(s3_endpoint, s3_bucket, tmp_path):
    local = _local_checkpoint(tmp_path, 2)
    with FaultyS3Proxy(s3_endpoint, fail_every=3, drop_every=5, drop_at="request") as proxy:
        persisted = persist(_context(s3_bucket, proxy.url), ray.train.Checkpoint.from_directory(str(local)),
                            "checkpoint_00000002")
    assert proxy.counters["slowdowns"] >= 2 and proxy.counters["drops"] >= 1, proxy.counters
    assert persisted.path == f"{s3_bucket}/{RUN}/checkpoint_00000002"

    # Read back directly (no proxy): complete, and every file byte-identical to what the rank wrote.
    run_dir = f"s3://{s3_bucket}/{RUN}"
    assert verify(f"{run_dir}/checkpoint_00000002")["step"] == 2
    for f in local.rglob("*"):
        if f.is_file():
            rel = f.relative_to(local).as_posix()
            got = storage.read_bytes(f"{run_dir}/checkpoint_00000002/{rel}")
            assert hashlib.sha256(got).digest() == hashlib.sha256(f.read_bytes()).digest(), rel


def test_failing_endpoint_fails_the_write_loudly_and_leaves_no_complete_checkpoint(s3_endpoint, s3_bucket,
                                                                                     tmp_path):
    run_dir = f"s3://{s3_bucket}/{RUN}"
    with FaultyS3Proxy(s3_endpoint) as proxy:
        # Fewer attempts than mmray's 10 (which take over a minute of backoff to give up): the outcome is the same.
        ctx = _context(s3_bucket, proxy.url, max_attempts=3)
        persist(ctx, ray.train.Checkpoint.from_directory(str(_local_checkpoint(tmp_path, 2))), "checkpoint_00000002")
        proxy.fail_every = 1  # from now on every request is answered 503 SlowDown
        with pytest.raises(CheckpointWriteError) as err:
            persist(ctx, ray.train.Checkpoint.from_directory(str(_local_checkpoint(tmp_path, 4))),
                    "checkpoint_00000004")
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint checkpoint_00000004 to {run_dir}/checkpoint_00000004: ")
    assert "HTTP status 503" in message and message.endswith("It is incomplete and will not be resumed from.")
    assert proxy.counters["slowdowns"] == 3  # every attempt was made before giving up

    with pytest.raises(IncompleteCheckpoint):
        verify(f"{run_dir}/checkpoint_00000004")
    rejected: list[str] = []
    assert latest_complete(run_dir, rejected=rejected, log=lambda _: None) == "checkpoint_00000002"


def test_keep_best_on_s3(s3_endpoint, s3_bucket, tmp_path):
    """run.keep_best on S3: the better checkpoint is copied server-side into best/, the displaced copy deleted."""
    from mmray.train.checkpoint import BEST_DIR, BestPolicy, keep_best, read_best_index

    ctx = _context(s3_bucket, s3_endpoint)
    fs, run_dir = ctx.storage_filesystem, ctx.experiment_fs_path
    policy = BestPolicy(keep=1, metric="loss", mode="min")
    for step, loss in ((2, 0.5), (4, 0.25), (6, 0.75)):
        name = f"checkpoint_{step:08d}"
        persist(ctx, ray.train.Checkpoint.from_directory(str(_local_checkpoint(tmp_path, step))), name)
        keep_best(run_dir, fs, name, loss, policy, log=lambda _: None)
    assert read_best_index(run_dir, fs)["scores"] == {"checkpoint_00000004": 0.25}
    best = fs.get_file_info(pafs.FileSelector(f"{run_dir}/{BEST_DIR}"))
    assert sorted(i.base_name for i in best) == ["best.json", "checkpoint_00000004"]
    assert verify(f"s3://{run_dir}/{BEST_DIR}/checkpoint_00000004")["step"] == 4  # digests included
