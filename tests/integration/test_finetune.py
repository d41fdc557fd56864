"""Fine-tuning under real DeepSpeed ZeRO-3: deferred (partitioned) construction, pretrained towers, frozen towers and
layer-wise learning-rate decay.

The first test runs two real gloo processes without Ray (cheaper) and loads the tower from S3; the second is one
2-worker Ray Train run whose final checkpoint is exported and compared with the files the towers started from.
"""
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mmray import config, storage
from mmray.export import export
from mmray.models import pretrained
from mmray.models.model import MultimodalModel
from mmray.train.engine import load_checkpoint_file
from mmray.train.trainer import resolve_data, train

from tiny_config import WORKERS, tiny_cfg

VOCAB, PAD = 50, 0
ZERO3 = ["train.zero_stage=3", "model.image_depth=2", "model.text_depth=1", "model.image_width=32",
         "model.text_width=32", "model.image_heads=2", "model.text_heads=2", "model.embed_dim=16",
         "data.image_size=16", "model.patch_size=8", "data.max_text_len=8"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deferred_worker(rank: int, world: int, port: int, overrides: list[str], tower_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed

    from mmray.models.model import init_std
    from mmray.train.engine import build_model

    try:
        torch.manual_seed(0)
        model = build_model(config.load(None, overrides), VOCAB, PAD, world, on_gpu=False)
        # No rank holds a whole parameter: each keeps its 1/world slice (padded to equal slices).
        for name, p in model.named_parameters():
            assert p.numel() == 0, f"{name} is materialised on rank {rank}"
            assert p.ds_tensor.numel() == math.ceil(p.ds_numel / world), name
        # The pretrained file reached every rank's slice; the model's own init ran on the rest.
        expected = load_file(tower_file)
        for name, p in model.image_encoder.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.data, expected[name]), name
        fc, ln = model.text_encoder.transformer.blocks[0].mlp.fc, model.text_encoder.ln_final
        with deepspeed.zero.GatheredParameters([fc.weight, fc.bias, ln.weight]):
            expected_std = init_std(fc)  # the init ran on the whole (gathered) layer, with its own fan-in
            assert abs(fc.weight.std().item() - expected_std) < 0.1 * expected_std
            assert not fc.bias.any() and ln.weight.eq(1).all()
        assert not any(p.requires_grad for p in model.text_encoder.parameters())
    finally:
        dist.barrier()  # no rank tears gloo down while its peer may still be talking to it
        dist.destroy_process_group()


def test_zero3_deferred_init_partitions_at_birth_and_loads_a_tower_from_s3(tmp_path, s3_bucket):
    cfg = config.load(None, ZERO3)
    torch.manual_seed(7)
    source = MultimodalModel(cfg.model, VOCAB, PAD, cfg.data.image_size, cfg.data.max_text_len)
    local = tmp_path / "image.safetensors"
    pretrained.save_tower(source, "image", str(local))
    remote = f"s3://{s3_bucket}/weights/image.safetensors"
    storage.write_bytes(remote, local.read_bytes())

    overrides = [*ZERO3, f"model.init_image={remote}", "model.freeze=text"]
    mp.spawn(_deferred_worker, args=(2, _port(), overrides, str(local)), nprocs=2, join=True)


def _starting_weights(cfg, vocab_size: int, pad_id: int, path: Path) -> dict[str, torch.Tensor]:
    """A whole-model file (as `mmray export` writes) whose towers are unlike any random init: N(0, 0.1) everywhere."""
    torch.manual_seed(11)
    model = MultimodalModel(cfg.model, vocab_size, pad_id, cfg.data.image_size, cfg.data.max_text_len)
    state = {k: (torch.randn_like(v) * 0.1).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def test_finetune_zero1_pretrained_image_frozen_text_with_layer_decay_exports_whole(ray_session, tiny_dataset, tmp_path):
    decay, steps = 0.5, 4
    base = tiny_cfg(tiny_dataset, tmp_path / "runs")
    tokenizer = resolve_data(base).tokenizer
    weights = tmp_path / "start.safetensors"
    start = _starting_weights(base, tokenizer.vocab_size, tokenizer.pad_id, weights)
    cfg = tiny_cfg(tiny_dataset, tmp_path / "runs", "train.zero_stage=1", f"model.init_image={weights}",
                   f"model.init_text={weights}", "model.freeze=text", f"train.layer_decay={decay}",
                   f"train.max_steps={steps}", "train.checkpoint_every=100")

    summary = train(cfg)
    assert summary["steps"] == steps

    export(summary["checkpoint"], str(tmp_path / "export"))
    final = load_file(str(tmp_path / "export" / "model.safetensors"))
    text = [k for k in final if k.startswith("fusion.text_encoder.")]
    image = [k for k in final if k.startswith("fusion.image_encoder.")]
    assert text and image
    for k in text:  # frozen: bit-identical to the file it started from
        assert torch.equal(final[k], start[k]), k
    # Trained from the file: Adam moves a weight by about lr per step at most, far less than N(0, 0.1) apart.
    moved = 0
    for k in image:
        assert (final[k] - start[k]).abs().max() <= steps * cfg.train.lr * 1.01, k
        moved += not torch.equal(final[k], start[k])
    assert moved > len(image) // 2

    # Every rank's optimizer groups kept their configured ratios to the base lr through warm-up and decay.
    ds = Path(summary["checkpoint"]) / "ds"
    for rank in range(WORKERS):
        saved = load_checkpoint_file(str(ds / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))["optimizer_state_dict"]
        groups = saved["base_optimizer_state"]["param_groups"]  # ZeRO-1/2 layout
        scales = sorted({g["lr_scale"] for g in groups}, reverse=True)
        assert scales == [1.0, decay, decay ** 2]  # image tower of depth 1: after it, its block, its embeddings
        base_lr = groups[0]["lr"]
        assert base_lr > 0
        for g in groups:
            assert math.isclose(g["lr"], base_lr * g["lr_scale"], rel_tol=1e-9)
