"""2 workers with gathered negatives give the loss and gradients of 1 worker on the same global batch.

Real gloo process groups in real processes; gradients are averaged across ranks as DeepSpeed does.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmray import config
from mmray.losses import compute_losses
from mmray.models.model import MultimodalModel

GLOBAL_BATCH = 8


def _setup():
    torch.manual_seed(0)
    cfg = config.load(None, ["model.image_depth=1", "model.text_depth=1"])
    model = MultimodalModel(cfg.model, 50, 0, cfg.data.image_size, 12)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    ids = torch.randint(1, 50, (GLOBAL_BATCH, 12), generator=g)
    return model, images, ids


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, images, ids = _setup()
    b = GLOBAL_BATCH // world
    loss = compute_losses(model(images[rank * b:(rank + 1) * b], ids[rank * b:(rank + 1) * b]))["loss"]
    loss.backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    # No rank tears gloo down while another may still be talking to it (an early exit can abort the peer).
    dist.barrier()
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_loss_and_grads_equal_single_worker(tmp_path, world):
    model, images, ids = _setup()
    loss = compute_losses(model(images, ids))["loss"]
    loss.backward()
    expected = _grads(model)

    try:
        mp.spawn(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # gloo's teardown can abort a finished process ("terminate called without an active exception", seen once
        # in a fresh-clone CI run); the result is only trusted from a clean run, so run it once more.
        if e.signal_name is None:
            raise
        mp.spawn(_worker, args=(world, _port(), str(tmp_path)), nprocs=world, join=True)
    got = torch.load(tmp_path / "dist.pt", weights_only=True)

    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert expected.keys() == got["grads"].keys()
    for name, g in expected.items():
        assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), name
    assert expected["fusion.logit_scale"].abs().item() > 0


def test_local_loss_without_gather_differs(tmp_path):
    """Guard against a vacuous test: a per-worker loss with only local negatives is not the global loss."""
    model, images, ids = _setup()
    full = compute_losses(model(images, ids))["loss"].item()
    halves = [compute_losses(model(images[i:i + 4], ids[i:i + 4]))["loss"].item() for i in (0, 4)]
    assert abs(sum(halves) / 2 - full) > 1e-3
