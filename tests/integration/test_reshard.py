"""Resuming a ZeRO-1/2/3 checkpoint on another number of workers (2 -> 1 and 1 -> 2) through DeepSpeed's universal
checkpoint: real engines in real gloo process groups (no Ray), loaded by mmray's own restore function.

Every parameter's fp32 master weights (assembled whole from the shards, as DeepSpeed exposes them) must equal those
of the engine that wrote the checkpoint, and so must they after one more step on the same global batch: that holds
only if the Adam moments, the step count and the learning-rate schedule carried over.
"""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmray import config
from mmray.config import ConfigError
from mmray.losses import compute_losses

# ZeRO-1 shares ZeRO-2's optimizer code (stage_1_and_2.py) and its universal load; it passed this test too, and is
# left out to keep the test cheap (each stage costs three engines per process).
STAGES = (2, 3)
VOCAB, PAD, GLOBAL = 50, 0, 4
TINY = ["model.image_depth=1", "model.text_depth=1", "model.image_width=32", "model.text_width=32",
        "model.image_heads=2", "model.text_heads=2", "model.embed_dim=16", "data.image_size=16", "model.patch_size=8",
        "data.max_text_len=8", "train.max_steps=10", "train.warmup_steps=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(stage: int, world: int):
    from mmray.train.engine import build_engine, build_model

    cfg = config.load(None, [*TINY, f"train.zero_stage={stage}", f"train.num_workers={world}",
                             f"train.micro_batch_size={GLOBAL // world}"])
    torch.manual_seed(0)
    return build_engine(build_model(cfg, VOCAB, PAD, world, on_gpu=False), cfg, world, on_gpu=False)


def _step(engine, step: int, rank: int, world: int) -> None:
    """One optimizer step on global batch number ``step`` (the same samples at any world size; rank r takes its
    slice: the loss gathers features across ranks and DeepSpeed averages gradients, so the step is the same)."""
    g = torch.Generator().manual_seed(step)
    images, ids = torch.randn(GLOBAL, 3, 16, 16, generator=g), torch.randint(1, VOCAB, (GLOBAL, 8), generator=g)
    rows = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    engine.backward(compute_losses(engine(images[rows], ids[rows]))["loss"])
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    """Each parameter's fp32 master weights, whole (a collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=1e-4, atol=1e-6), (what, name, (got[name] - tensor).abs().max())


def _worker(rank: int, world: int, port: int, root: str, load_from: int | None, save: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from mmray.train.checkpoint import DS_TAG, STATE_FILE, load

    for stage in STAGES:
        if load_from is not None:  # resume what `load_from` ranks wrote, and check it against what they had
            engine = _engine(stage, world)
            d = Path(root, f"w{load_from}", f"zero{stage}")
            if stage == 2:  # a checkpoint that cannot be converted (its optimizer shards are gone) says what to do
                broken = Path(root, f"broken-from{load_from}-rank{rank}")
                shutil.copytree(d, broken)
                for f in broken.glob("ds/*optim_states.pt"):
                    f.unlink()
                with pytest.raises(ConfigError, match=rf"written by {load_from} workers under ZeRO-2, and this run "
                                                      rf"has {world}; converting it .* failed .*Resume with "
                                                      rf"train.num_workers={load_from}, or `mmray export` it"):
                    load(engine, str(broken), broken.name, written_by=load_from, world_size=world)
            state = load(engine, str(d), d.name, written_by=load_from, world_size=world)
            assert state["step"] == engine.global_steps == 2, (state, engine.global_steps)
            expected = torch.load(d / "weights.pt", weights_only=True)
            _assert_close(_weights(engine), expected["step2"], f"ZeRO-{stage} weights as saved")
            # The next step equals the writer's only if Adam's moments and step count carried over too (fresh
            # moments would move every weight by about lr instead).
            _step(engine, 3, rank, world)
            _assert_close(_weights(engine), expected["step3"], f"ZeRO-{stage} weights after the next step")
            moved = max(float((expected["step3"][n] - expected["step2"][n]).abs().max()) for n in expected["step2"])
            assert moved > 1e-4  # the step is large against the tolerance: a wrong optimizer state would show
        if save:
            engine = _engine(stage, world)
            for step in (1, 2):
                _step(engine, step, rank, world)
            d = Path(root, f"w{world}", f"zero{stage}")
            engine.save_checkpoint(str(d), tag=DS_TAG)
            weights = {"step2": _weights(engine)}
            _step(engine, 3, rank, world)
            weights["step3"] = _weights(engine)
            if rank == 0:
                (d / STATE_FILE).write_text(json.dumps({"step": 2, "world_size": world}))
                torch.save(weights, d / "weights.pt")
        dist.barrier()
    # No try/finally: a failed rank exits at once and mp.spawn ends its peer, which may wait in a collective.
    dist.barrier()  # no rank tears gloo down while its peer may still be talking to it
    dist.destroy_process_group()


def _spawn(world: int, root: Path, load_from: int | None, save: bool) -> None:
    mp.spawn(_worker, args=(world, _port(), str(root), load_from, save), nprocs=world, join=True)


def test_zero_checkpoints_resume_on_another_worker_count(tmp_path):
    _spawn(2, tmp_path, load_from=None, save=True)  # 2 ranks write ZeRO-1, 2 and 3 checkpoints
    _spawn(1, tmp_path, load_from=2, save=True)  # 1 rank resumes them, and writes its own
    _spawn(2, tmp_path, load_from=1, save=False)  # 2 ranks resume those


def test_unsafe_file_is_refused_before_conversion(tmp_path):
    """DeepSpeed's converter unpickles with weights_only=False: mmray checks every file weights-only first."""
    from mmray.train.checkpoint import to_universal

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ds").mkdir()
    torch.save({"module": {}, "evil": Exploit()}, tmp_path / "ds" / "mp_rank_00_model_states.pt")
    with pytest.raises(Exception, match="posix.system"):
        to_universal(str(tmp_path / "ds"), str(tmp_path / "out" / "ds"))
    assert not marker.exists()
