"""Which checkpoint a restart resumes from: the one Ray Train hands back, unless a newer one is complete on storage
(workers that die right after a checkpoint can leave it unregistered by Ray Train's controller)."""
from types import SimpleNamespace

import pyarrow.fs as pafs

from mmray.train.checkpoint import decide

from test_manifest import _truncate, _write_checkpoint


def _handed_back(path):
    return SimpleNamespace(path=str(path), filesystem=pafs.LocalFileSystem())


def test_a_newer_complete_checkpoint_than_rays_is_resumed_from(tmp_path):
    run = tmp_path / "run"
    two, four = _write_checkpoint(run / "checkpoint_00000002", step=2), _write_checkpoint(run / "checkpoint_00000004")
    logged = []
    d = decide(_handed_back(two), (pafs.LocalFileSystem(), str(run)), log=logged.append)
    assert d.name == "checkpoint_00000004" and d.rejected == []
    assert logged == [f"Ray Train handed back checkpoint_00000002, but checkpoint_00000004 is newer and complete in "
                      f"{run}: resuming from it"]

    # A newer one that is incomplete is refused (and reported); Ray's own is resumed from.
    _truncate(four)
    d = decide(_handed_back(two), (pafs.LocalFileSystem(), str(run)), log=logged.append)
    assert d.name == "checkpoint_00000002"
    assert len(d.rejected) == 1 and d.rejected[0].startswith("checkpoint_00000004: ")
    # Ray handing back the newest one: nothing else is looked at.
    assert decide(_handed_back(four), (pafs.LocalFileSystem(), str(run)), log=logged.append).name == \
        "checkpoint_00000002"


def test_checkpoints_beyond_keep_last_that_ray_does_not_manage_are_deleted(tmp_path):
    """After a run, Ray Train keeps checkpoints 6 and 8 (run.keep_last=2); 2 (complete, from before a killed driver)
    and 3 (a partial upload) it never knew. They go; the kept ones, best/ and other files stay. A rerun's name
    (8_eval1) is the newest checkpoint, so it takes one of the keep_last places, but never a kept one's."""
    from mmray.train.checkpoint import prune_unmanaged

    run = tmp_path / "run"
    for step in (2, 6, 8):
        _write_checkpoint(run / f"checkpoint_{step:08d}", step=step)
    (run / "checkpoint_00000003").mkdir()
    (run / "checkpoint_00000003" / "state.json").write_text("{}")
    (run / "best" / "checkpoint_00000002").mkdir(parents=True)
    (run / "cost.json").write_text("{}")
    kept = ["checkpoint_00000008", "checkpoint_00000006"]

    def names():
        return sorted(p.name for p in run.iterdir() if not p.name.startswith("."))

    # With a larger run.keep_last (or checkpoints from an earlier start that Ray Train forgot), they are kept.
    assert prune_unmanaged(str(run), kept, keep_last=4) == []
    (run / "checkpoint_00000008_eval1").mkdir()
    assert prune_unmanaged(str(run), kept, keep_last=4) == ["checkpoint_00000002"]
    (run / "checkpoint_00000002").mkdir()
    logged = []
    gone = prune_unmanaged(str(run), kept, keep_last=2, log=logged.append)
    assert sorted(gone) == ["checkpoint_00000002", "checkpoint_00000003"]
    assert names() == ["best", "checkpoint_00000006", "checkpoint_00000008", "checkpoint_00000008_eval1",
                       "cost.json"]
    assert (run / "best" / "checkpoint_00000002").is_dir()
    assert logged and "keep_last=2: checkpoint_00000002, checkpoint_00000003" in logged[0]
    # Nothing kept (no checkpoint reported): nothing is deleted.
    assert prune_unmanaged(str(run), [], keep_last=1) == [] and (run / "checkpoint_00000006").is_dir()
