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
