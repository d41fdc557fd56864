"""The Ray that mmray starts on one machine (mmray.train.trainer.start_local_ray; the session's Ray is started by it
too): every Ray Train run starts a placement-group cleaner that asks Ray's state API, from a worker process, whether
the run's controller is alive. The workers must reach this instance's state API, not whatever cluster
/tmp/ray/ray_current_cluster names (the last `ray start` on the machine, often long gone: each query then waited 40 s
for a dead GCS, and every run ended 12 s late)."""
import os
import time

import ray


@ray.remote(num_cpus=0)
class Probe:
    def api_server(self) -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    def alive(self, actor_id: str) -> bool:
        from ray.train.v2._internal.state.util import is_actor_alive  # what the cleaner calls

        return is_actor_alive(actor_id=actor_id, timeout=10)


def test_workers_ask_this_instances_state_api_and_get_the_truth(ray_session):
    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
    probe, other = Probe.remote(), Probe.remote()
    assert ray.get(probe.api_server.remote()) == f"http://{dashboard}" and dashboard.startswith("127.0.0.1:")
    assert ray.get(probe.alive.remote(other._actor_id.hex())) is True
    ray.kill(other)
    deadline = time.monotonic() + 30
    while ray.get(probe.alive.remote(other._actor_id.hex())):
        assert time.monotonic() < deadline, "the state API still reports a killed actor alive after 30 s"
        time.sleep(0.2)
    ray.kill(probe)


def test_a_run_that_cannot_get_its_resources_here_is_refused_before_it_waits(ray_session):
    """train.use_gpu=true on a machine without a GPU, or workers that would take every CPU, would wait forever for
    resources; a Ray this process started refuses them at once. A joined cluster, and the one a sweep's trials run in
    ("in-process"), may add GPU nodes through their autoscaler: there only the CPU check applies."""
    import pytest

    from mmray import config
    from mmray.train.trainer import check_cluster_fits

    assert not ray.cluster_resources().get("GPU")
    gpu = config.load(None, ["train.use_gpu=true", "train.num_workers=1"])
    with pytest.raises(config.ConfigError, match="train.use_gpu=true, but this machine has no GPU"):
        check_cluster_fits(gpu, "local")
    check_cluster_fits(gpu, "joined")
    check_cluster_fits(gpu, "in-process")
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(config.ConfigError, match=f"has {cpus} CPUs and the {cpus} training workers reserve"):
        check_cluster_fits(config.load(None, [f"train.num_workers={cpus}"]), "local")
