"""Shared fixtures: one moto S3 server over real HTTP on 127.0.0.1, and one Ray instance per session."""
from __future__ import annotations

import os
import socket

import pytest

# Keep CPU math single-threaded and deterministic across the suite; DeepSpeed runs on its CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every ray.train.report() waits for the Train controller's next poll of the workers (2 s by default); the tiny
# test runs report every step or two, so a shorter poll cuts seconds from each run without changing behaviour.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1, with throwaway credentials in the environment.

    Yields the endpoint URL. AWS_ENDPOINT_URL is set so that boto3 and pyarrow pick it up the standard way.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = "mmray-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray instance for the whole session (2 real cores; 4 logical CPUs so data tasks and workers fit).

    It starts after the S3 endpoint so that Ray's workers inherit AWS_ENDPOINT_URL and the test credentials, as
    they would inherit a node's environment on a cluster.
    """
    import ray

    if not ray.is_initialized():
        # Ray kills a task worker 1 s after it goes idle once the node has num_cpus workers (the training runs'
        # actors count), so every run's data tasks started fresh processes that import Ray Data again: 1.5-4 s a
        # tiny run. Keeping up to 10 idle workers for 10 min lets the next run's tasks reuse them.
        # mmray's own local start (with the dashboard Ray Train's placement-group cleaner needs, see there).
        from mmray.train.trainer import start_local_ray

        start_local_ray(4, log_to_driver=False,
                        _system_config={"num_workers_soft_limit": 10, "idle_worker_killing_time_threshold_ms": 600_000})
    yield ray
    ray.shutdown()


def release_placement_groups(report: bool = False) -> None:
    """Remove every placement group of the session's Ray that is still held (or waiting to be)."""
    import sys

    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info["state"] in ("CREATED", "PENDING", "RESCHEDULING"):
            if report:
                print(f"conftest: removing placement group {pg_id} ({info.get('name') or 'unnamed'}, "
                      f"{info['bundles']}) left after the test", file=sys.stderr)
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.fixture
def placement_group_release():
    """:func:`release_placement_groups`, for a test that must free what an interrupted run still holds."""
    return release_placement_groups


@pytest.fixture(autouse=True)
def _release_leaked_placement_groups():
    """Between tests nothing trains, so no placement group should be left in the session's Ray. Ray Train V2 can
    leave its run's group behind when its controller's shutdown times out on a loaded machine (seen in a full run:
    "Failed to stop PlacementGroupCleaner gracefully", then the run's CPUs stayed reserved and a later 2-trial sweep
    starved of CPUs for its data tasks). Remove any such group, so that one test's leak cannot hang the next."""
    yield
    import ray

    if ray.is_initialized():
        release_placement_groups(report=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small prepared synthetic shapes set (local), shared by the training tests."""
    from mmray.data.prepare import prepare_synthetic

    root = str(tmp_path_factory.mktemp("data") / "shapes")
    prepare_synthetic(root, samples=640, seed=3, val_samples=128, samples_per_shard=256)
    return root
