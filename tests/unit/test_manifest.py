"""Checkpoint manifests: a checkpoint is complete only when every rank's manifest and every listed file agree."""
import json
from pathlib import Path

import pytest

from mmray.train.checkpoint import (IncompleteCheckpoint, latest_complete, list_checkpoints, unique_name, verify,
                                    write_manifest)

WORLD = 2


def _write_checkpoint(root: Path, step: int = 4, world: int = WORLD) -> Path:
    """A merged checkpoint as Ray Train leaves it: each rank wrote its own part, then the parts were merged."""
    for rank in range(world):
        part = root.parent / f".{root.name}.rank{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank]) * 1000)
        if rank == 0:
            (part / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
            (part / "state.json").write_text(json.dumps({"step": step, "world_size": world}))
            (part / "config.yaml").write_text("train: {}\n")
        write_manifest(str(part), rank, world, step)
        for p in part.rglob("*"):
            if p.is_file():
                dest = root / p.relative_to(part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(p.read_bytes())
    return root


@pytest.fixture
def ckpt(tmp_path):
    return _write_checkpoint(tmp_path / "run" / "checkpoint_00000004")


def test_complete_checkpoint_verifies_and_returns_its_state(ckpt):
    assert verify(str(ckpt)) == {"step": 4, "world_size": WORLD}
    manifest = json.loads((ckpt / "manifest.rank1.json").read_text())
    assert manifest["world_size"] == WORLD and manifest["step"] == 4
    assert set(manifest["files"]) == {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    entry = manifest["files"]["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert entry["bytes"] == 1000 and len(entry["sha256"]) == 64


def _truncate(ckpt):
    p = ckpt / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    p.write_bytes(p.read_bytes()[:500])


def _flip_byte(ckpt):
    p = ckpt / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(p.read_bytes())
    data[10] ^= 0x01
    p.write_bytes(bytes(data))


def _edit_manifest(ckpt):
    p = ckpt / "manifest.rank1.json"
    m = json.loads(p.read_text())
    m["step"] = 2
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("tamper, names", [
    (lambda c: (c / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
     "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    (_truncate, "zero_pp_rank_1_mp_rank_00_optim_states.pt has 500 bytes"),
    (_flip_byte, "mp_rank_00_model_states.pt does not match its sha256"),
    (lambda c: (c / "manifest.rank1.json").unlink(), "manifest.rank1.json is missing"),
    (lambda c: (c / "manifest.rank0.json").unlink(), "manifest.rank0.json is missing"),
    (lambda c: (c / "manifest.rank0.json").write_text("{not json"), "manifest.rank0.json is not valid JSON"),
    (_edit_manifest, "manifest.rank1.json does not match"),
    (lambda c: (c / "manifest.rank2.json").write_text("{}"), "manifest.rank2.json belongs to no rank"),
    (lambda c: (c / "state.json").write_text('{"step": 4, "world_size": 2} '), "state.json has 29 bytes, the manifest says 28"),
], ids=["missing-shard", "truncated", "flipped-byte", "missing-rank-manifest", "missing-rank0-manifest",
        "bad-json", "manifest-mismatch", "stray-manifest", "state-rewritten"])
def test_tampered_checkpoint_is_refused_naming_the_file(ckpt, tamper, names):
    tamper(ckpt)
    with pytest.raises(IncompleteCheckpoint, match=names.replace(".", r"\.")):
        verify(str(ckpt))


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(IncompleteCheckpoint, match="empty or missing"):
        verify(str(tmp_path / "nope"))


def test_newest_complete_checkpoint_is_found_newest_first(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _write_checkpoint(run / f"checkpoint_{step:08d}", step)
    _write_checkpoint(run / "checkpoint_00000004_r1", 4)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "not_a_checkpoint").mkdir()
    assert list_checkpoints(str(run)) == ["checkpoint_00000006", "checkpoint_00000004_r1", "checkpoint_00000004",
                                          "checkpoint_00000002"]
    _truncate(run / "checkpoint_00000006")
    (run / "checkpoint_00000004_r1" / "manifest.rank0.json").unlink()
    rejected = []
    assert latest_complete(str(run), rejected=rejected, log=lambda m: None) == "checkpoint_00000004"
    assert [r.split(":")[0] for r in rejected] == ["checkpoint_00000006", "checkpoint_00000004_r1"]
    assert latest_complete(str(run), skip=("checkpoint_00000004",), log=lambda m: None) == "checkpoint_00000002"
    assert list_checkpoints(str(tmp_path / "missing")) == []


def test_unique_names_never_reuse_a_directory():
    taken = {"checkpoint_00000004", "checkpoint_00000006_eval1", "checkpoint_00000006_eval2"}
    assert unique_name(2, taken, "r") == "checkpoint_00000002"
    assert unique_name(4, taken, "r") == "checkpoint_00000004_r1"
    assert unique_name(6, taken, "eval", always=True) == "checkpoint_00000006_eval3"
    assert unique_name(4, taken, "eval", always=True) == "checkpoint_00000004_eval1"
