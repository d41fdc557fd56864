"""Real DeepSpeed engines in a real 2-process gloo group (no Ray, to stay cheap): every supported combination of ZeRO
stage, optimizer / parameter offload and activation checkpointing builds and trains, to the same losses; the same
config and seed give the same loss curve; and a collective that a peer never joins times out instead of hanging.

The engines are built as the training loop builds them (engine.build_model / build_engine after seeding with
train.seed), over fixed per-rank batches drawn from the seed.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmray import config
from mmray.losses import compute_losses

# DeepSpeed's WarmupCosineLR gives the first two steps lr 0 (before its first step() it reports a ratio of 0, and the
# linear warm-up starts from 0), so the first three losses are all the initial weights' (dropout makes them differ).
WORLD, MICRO, STEPS = 2, 4, 6
TIMEOUT_S = 3
TINY = ["model.image_depth=2", "model.text_depth=1", "model.image_width=32", "model.text_width=32",
        "model.image_heads=2", "model.text_heads=2", "model.embed_dim=16", "data.image_size=16", "model.patch_size=8",
        "data.max_text_len=8", "model.dropout=0.1", f"train.micro_batch_size={MICRO}", "train.max_steps=10",
        "train.warmup_steps=1", "train.lr=1e-2", f"train.num_workers={WORLD}"]
# name -> overrides; "zero0" is the reference the others must match.
RUNS = {
    "zero0": ["train.zero_stage=0"],
    "zero0-again": ["train.zero_stage=0"],
    "zero0-seed1": ["train.zero_stage=0", "train.seed=1"],
    "zero1-offload": ["train.zero_stage=1", "train.offload_optimizer=cpu"],
    "zero2-offload-ckpt": ["train.zero_stage=2", "train.offload_optimizer=cpu", "train.activation_checkpointing=true"],
    "zero3-offload-params": ["train.zero_stage=3", "train.offload_param=cpu"],
    "zero3-offload-all-ckpt": ["train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_param=cpu",
                               "train.activation_checkpointing=true"],
}
# The other strategies (the runs above are late fusion, the default), each under ZeRO-3 with recomputation against
# its own ZeRO-0 losses: ZeRO-3 partitions every parameter of the fusion modules and gathers them in its hooks.
OTHER_FUSIONS = ("early", "hierarchical", "attention")
for _fusion in OTHER_FUSIONS:
    RUNS[f"{_fusion}-zero0"] = [f"model.fusion={_fusion}", "train.zero_stage=0"]
    RUNS[f"{_fusion}-zero3-ckpt"] = [f"model.fusion={_fusion}", "train.zero_stage=3",
                                     "train.activation_checkpointing=true"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offload(engine) -> dict:
    """What is actually on: offload, from the ZeRO optimizer's own flags, and the blocks' recomputation."""
    opt = engine.optimizer
    return {"optimizer": bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)),
            "param": bool(getattr(opt, "offload_param", False)),
            "recompute": any(getattr(m, "recompute", False) for m in engine.module.modules())}


def _train(cfg, rank: int, world: int) -> tuple[list[float], dict]:
    """STEPS optimizer steps: the mean loss across ranks of each (what the loop logs), and what was on."""
    from mmray.train.engine import build_engine, build_model

    torch.manual_seed(cfg.train.seed)  # as the loop does, before the model is built
    engine = build_engine(build_model(cfg, 50, 0, world, on_gpu=False), cfg, world, on_gpu=False)
    data = torch.Generator().manual_seed(cfg.train.seed * 100 + rank)  # this rank's share of the data
    # One batch per rank, every step: the loss falls only if the updates do something (on fresh random batches each
    # step it moves with the batch).
    images = torch.randn(MICRO, 3, 16, 16, generator=data)
    ids = torch.randint(1, 50, (MICRO, 8), generator=data)
    losses = []
    for _ in range(STEPS):
        loss = compute_losses(engine(images, ids))["loss"]
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses, _offload(engine)


def _hang_a_collective(rank: int, world: int, port: int, out: str) -> None:
    """A fresh process group set up as Ray Train sets up its workers' with our TorchConfig; rank 0 starts an
    all-reduce that rank 1 never joins. Rank 0 records what happened, and how long it took, in ``out``."""
    from ray.train.torch.config import _setup_torch_process_group

    from mmray.train.trainer import torch_config

    tc = torch_config(config.load(None, [f"train.collective_timeout_s={TIMEOUT_S}"]), use_gpu=False)
    assert (tc.backend, tc.timeout_s) == ("gloo", TIMEOUT_S)
    os.environ["MASTER_PORT"] = str(port)
    # What Ray Train's workers run with a TorchConfig (ray.train.torch.config._TorchBackend.on_start).
    _setup_torch_process_group(tc.backend, rank, world, "env://", timeout_s=tc.timeout_s)
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "returned"
        except RuntimeError as e:
            outcome = str(e)
        torch.save({"elapsed": time.monotonic() - t0, "outcome": outcome}, out + ".tmp")
        os.replace(out + ".tmp", out)
    else:
        while not os.path.exists(out):  # alive, but busy elsewhere: the all-reduce cannot complete
            time.sleep(0.1)


def _worker(rank: int, world: int, ports: tuple[int, int], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {name: _train(config.load(None, [*TINY, *overrides]), rank, world)
                   for name, overrides in RUNS.items()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "runs.pt"))
    finally:
        dist.barrier()  # no rank tears gloo down while its peer may still be talking to it
        dist.destroy_process_group()
    # The same processes then test the timeout (a second spawn would cost more than everything above).
    _hang_a_collective(rank, world, ports[1], os.path.join(out_dir, "timeout.pt"))
    os._exit(0)  # that group is broken; skip gloo's teardown, which would wait on the peer


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds")
    ctx = mp.spawn(_worker, args=(WORLD, (_port(), _port()), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 600  # a hung collective fails these tests rather than the suite's clock
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process group hung")
    return {"runs": torch.load(out / "runs.pt", weights_only=True),
            "timeout": torch.load(out / "timeout.pt", weights_only=True)}


@pytest.fixture
def runs(results) -> dict:
    return results["runs"]


@pytest.mark.parametrize("name, offload", [
    ("zero0", {"optimizer": False, "param": False, "recompute": False}),
    ("zero1-offload", {"optimizer": True, "param": False, "recompute": False}),
    ("zero2-offload-ckpt", {"optimizer": True, "param": False, "recompute": True}),
    ("zero3-offload-params", {"optimizer": False, "param": True, "recompute": False}),
    ("zero3-offload-all-ckpt", {"optimizer": True, "param": True, "recompute": True}),
])
def test_each_combination_trains_to_the_reference_losses(runs, name, offload):
    """Offload and recomputation move state and time, never the numbers: every ZeRO stage and offload gives the
    losses of plain data parallelism (ZeRO-0), with dropout, gradient clipping and the warm-up schedule on."""
    losses, where = runs[name]
    assert where == offload
    assert losses == pytest.approx(runs["zero0"][0], rel=1e-5)
    assert losses[-1] < min(losses[:3]) - 0.1  # it trains: below every loss of the initial weights (see STEPS)


@pytest.mark.parametrize("fusion", OTHER_FUSIONS)
def test_every_fusion_strategy_trains_to_its_reference_losses_under_zero3(runs, fusion):
    losses, where = runs[f"{fusion}-zero3-ckpt"]
    assert where == {"optimizer": False, "param": False, "recompute": True}
    assert losses == pytest.approx(runs[f"{fusion}-zero0"][0], rel=1e-5)
    # The updates move the loss far more than dropout does (lr 1e-2 on these tiny towers overshoots, so the loss
    # need not fall in 6 steps; that each strategy learns is tests/unit/test_fusions.py's and the sweeps' part).
    assert max(abs(x - losses[2]) for x in losses[3:]) > 0.1
    assert losses != pytest.approx(runs["zero0"][0], rel=1e-3)  # another model than late fusion's


def test_same_config_and_seed_give_the_same_loss_curve(runs):
    assert runs["zero0-again"][0] == runs["zero0"][0]  # bit for bit
    # and the seed matters: another one gives another curve (initial weights, data, dropout)
    assert all(abs(a - b) > 1e-3 for a, b in zip(runs["zero0-seed1"][0], runs["zero0"][0]))


def test_a_collective_a_peer_never_joins_times_out(results):
    """train.collective_timeout_s reaches gloo through Ray Train's TorchConfig: the all-reduce fails after it."""
    got = results["timeout"]
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in got["outcome"]
    assert TIMEOUT_S - 0.5 <= got["elapsed"] < TIMEOUT_S + 30
