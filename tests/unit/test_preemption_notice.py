"""An emergency checkpoint is taken once per preemption notice (Ray Train's get_preemption_info is stubbed)."""
import time

import ray.train
from ray.train import PreemptionInfo

from mmray.train.checkpoint import Checkpointer


def test_each_new_notice_triggers_once(monkeypatch):
    deadline = int(time.time() * 1000) + 60_000
    notices = iter([None, PreemptionInfo(deadline, {"node-a": [1]}), PreemptionInfo(deadline, {"node-a": [1]}),
                    PreemptionInfo(deadline, {"node-a": [1], "node-b": [0]}), None])
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: next(notices))
    checkpointer = Checkpointer(engine=None, rank=0, world_size=2, extra_files={})
    assert [checkpointer.preemption_notice() for _ in range(5)] == [False, True, False, True, False]
