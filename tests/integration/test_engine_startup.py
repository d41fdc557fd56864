"""Starting a DeepSpeed engine on CPU compiles nothing: the CPU shared-memory all-reduce op, which only inference
tensor parallelism calls, is not JIT-built (it cost about 100 s in every fresh environment), and training's
collectives still work through torch.distributed."""
import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from mmray import config
    from mmray.models.model import MultimodalModel
    from mmray.train.engine import build_engine

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
    cfg = config.load(None, ["model.image_depth=1", "model.text_depth=1", "train.micro_batch_size=2",
                             "train.zero_stage=2", "train.max_steps=4", "train.warmup_steps=1"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, 50, 0, cfg.data.image_size, 8)
    engine = build_engine(model, cfg, 1, on_gpu=False)
    images, ids = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size), torch.randint(1, 50, (2, 8))
    from mmray.losses import compute_losses
    before = [p.detach().clone() for p in engine.module.parameters()]
    for _ in range(3):  # DeepSpeed's WarmupCosineLR gives the first two steps lr 0
        loss = compute_losses(engine(images, ids))["loss"]
        engine.backward(loss)
        engine.step()
    changed = any((p.detach() != b).any() for p, b in zip(engine.module.parameters(), before))
    from deepspeed.comm import comm as ds_comm
    from mmray.train.engine import count_parameters
    print("STEPPED", loss.item(), bool(changed), ds_comm.cdb.shm_comm_op is None)
    print("BUCKET", engine.zero_reduce_bucket_size(), count_parameters(engine.module))
    dist.destroy_process_group()
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_engine_starts_without_building_the_shm_comm_op(tmp_path):
    # An empty extensions directory: any JIT build would land here (and take about 100 s).
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what Ray Train sets in its workers
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(_port())], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("STEPPED")][-1].split()
    assert line[1] != "nan" and line[2] == "True"  # a finite loss, and the optimizer step changed the weights
    assert line[3] == "True"  # DeepSpeed's comm backend has no shm op
    # DeepSpeed's reduction bucket is the model's size, not its 5e8-element default (2 GB of fp32 per rank).
    bucket, n_params = [x for x in out.stdout.splitlines() if x.startswith("BUCKET")][-1].split()[1:]
    assert int(n_params) <= int(bucket) < int(n_params) + 1024
    built = list((tmp_path / "ext").rglob("*")) if (tmp_path / "ext").exists() else []
    assert not built, built
