"""ZeRO memory: the bytes of parameters, gradients and optimizer state that each rank's DeepSpeed engine holds under
ZeRO 0, 1, 2 and 3 with 2 workers, against the ZeRO paper's formulas. Prints one JSON object.

For each stage, ``--workers`` real processes form a gloo group and each builds mmray's own model and engine
(:func:`mmray.train.engine.build_model` / :func:`build_engine`, fp32 on CPU with torch's AdamW, ZeRO-3 partitioned
from birth). Each trains one step (so that Adam's state exists), runs the forward and backward of a second and, before
that step's update, while parameters, gradients and optimizer state are all held, counts what its engine holds: every
tensor reachable from the engine (model, ZeRO optimizer, torch optimizer), deduplicated by storage, sorted into

- ``params``: the model's parameters (under ZeRO-3 each one's ``ds_tensor`` partition, plus any full copy it keeps);
- ``grads``: the parameters' ``.grad`` and the ZeRO optimizer's gradient partitions;
- ``optimizer``: the torch optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) and, where they are not
  the model's own parameters, the fp32 tensors it updates (a master copy);
- ``buffers``: DeepSpeed's gradient-reduction buckets (``ipg_buckets``), which the paper counts as temporary buffers,
  not model states; and ``other``: anything else (named by path in the output).

The paper (Rajbhandari et al. 2020, fig. 1) counts mixed-precision Adam as 2 bytes of fp16 parameters, 2 of fp16
gradients and K = 12 of optimizer state (fp32 parameters, momentum, variance) per parameter Psi; with N ranks:
ZeRO-0 16 Psi, ZeRO-1 4 Psi + 12 Psi / N, ZeRO-2 2 Psi + 14 Psi / N, ZeRO-3 16 Psi / N. On CPU mmray trains in fp32,
where the fp32 master copy is redundant: 4 bytes of parameters, 4 of gradients and K = 8 (momentum, variance), so
ZeRO-0 16 Psi, ZeRO-1 8 Psi + 8 Psi / N, ZeRO-2 4 Psi + 12 Psi / N, ZeRO-3 16 Psi / N. That is the goal's formula
(``fp32``, within 10%); ``fp32_master`` (K = 12: the same with an fp32 copy of the parameters in the optimizer) is
given beside it, since DeepSpeed's ZeRO-1, 2 and 3 optimizers keep such a copy even when the model is fp32.

    python bench/zero_memory.py --preset small
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch

STAGES = (0, 1, 2, 3)
VOCAB, PAD = 512, 0
# Per-parameter bytes: (parameters, gradients, optimizer state K).
VARIANTS = {"mixed_precision_paper": (2, 2, 12), "fp32": (4, 4, 8), "fp32_master": (4, 4, 12)}
GOAL_VARIANT, GOAL_TOLERANCE = "fp32", 0.10


def formula_bytes(stage: int, psi: int, n: int, param_bytes: int = 4, grad_bytes: int = 4,
                  k: int = 8) -> dict[str, float]:
    """Per-rank model-state bytes under ZeRO ``stage`` with ``n`` ranks: stage 1 partitions the optimizer state,
    stage 2 also the gradients, stage 3 also the parameters (the paper's Psi * (2 + 2 + K) family)."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage {stage} does not exist; choose from {STAGES}")
    if n < 1 or psi < 0:
        raise ValueError(f"need n >= 1 ranks and psi >= 0 parameters (got n={n}, psi={psi})")
    out = {"params": param_bytes * psi / (n if stage >= 3 else 1),
           "grads": grad_bytes * psi / (n if stage >= 2 else 1),
           "optimizer": k * psi / (n if stage >= 1 else 1)}
    out["total"] = sum(out.values())
    return out


def _tensors(root, path: str):
    """(path, tensor) for every tensor reachable from ``root`` through DeepSpeed / torch / mmray objects, containers
    and tensor attributes (``grad``, ``ds_tensor``); each object visited once."""
    seen, stack = set(), [(path, root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path, obj
            for attr in ("ds_tensor", "grad"):
                sub = obj.__dict__.get(attr) if attr == "ds_tensor" else (obj.grad if obj.is_leaf else None)
                stack.append((f"{path}.{attr}", sub))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path}[key]", v))
                if isinstance(k, torch.Tensor):
                    stack.append((f"{path}[key]", k))
        elif isinstance(obj, (list, tuple, set)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "mmray") and hasattr(obj, "__dict__"):
            if type(obj).__module__.startswith("torch.distributed"):
                continue  # process groups and their handles
            stack.extend((f"{path}.{k}", v) for k, v in vars(obj).items())


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the non-empty storages under ``tensors`` (views of one storage count once)."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = s.nbytes()
    return out


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flat(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flat(v)
    elif obj is not None and hasattr(obj, "buffer"):  # DeepSpeed's IPG bucket
        yield from _flat(obj.buffer)


def held_bytes(engine) -> dict:
    """What the engine holds, by role, in bytes (each storage counted once, in the first role that claims it)."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer; ZeRO-0 fp32 uses it directly
    params = list(engine.module.parameters())
    roles = {
        "params": _storages([*params, *(getattr(p, "ds_tensor", None) for p in params)]),
        "grads": _storages([*(p.grad for p in params),
                            *(t for a in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer")
                              for t in _flat(getattr(zero, a, None))),
                            *(p.grad for g in inner.param_groups for p in g["params"])]),
        # Adam's state, and the tensors it updates (its state's keys; ZeRO-3 empties param_groups between steps)
        "optimizer": _storages([*_flat(list(inner.state.values())), *inner.state,
                                *(p for g in inner.param_groups for p in g["params"])]),
        "buffers": _storages(_flat(getattr(zero, "ipg_buckets", None))),
    }
    claimed: dict[int, str] = {}
    for role, storages in roles.items():
        for ptr in storages:
            claimed.setdefault(ptr, role)
    out = {role: sum(n for ptr, n in roles[role].items() if claimed[ptr] == role) for role in roles}
    other: dict[int, tuple[str, int]] = {}
    for path, t in _tensors(engine, "engine"):
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in claimed:
            other.setdefault(s.data_ptr(), (path, s.nbytes()))
    out["other"] = sum(n for _, n in other.values())
    out["other_largest"] = [f"{path}: {n}" for path, n in sorted(other.values(), key=lambda x: -x[1])[:3]]
    out["model_states"] = out["params"] + out["grads"] + out["optimizer"]
    # ZeRO-3 keeps parameters below stage3_param_persistence_threshold whole on every rank (and their partition)
    out["params_whole_under_zero3"] = sum(_storages(p for p in params if hasattr(p, "ds_tensor")).values())
    return out


def _worker(rank: int, world: int, port: int, stage: int, overrides: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from mmray import config
    from mmray.losses import compute_losses
    from mmray.models.objectives import objective_weights
    from mmray.train.engine import build_engine, build_model

    try:
        cfg = config.load(None, [*overrides, f"train.zero_stage={stage}", f"train.num_workers={world}"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, VOCAB, PAD, world, on_gpu=False)
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        engine = build_engine(model, cfg, world, on_gpu=False)
        weights = objective_weights(cfg.model)
        g = torch.Generator().manual_seed(rank)
        b, s, t = cfg.train.micro_batch_size, cfg.data.image_size, cfg.data.max_text_len
        batch = (torch.randn(b, 3, s, s, generator=g), torch.randint(1, VOCAB, (b, t), generator=g))
        for step in range(2):
            engine.backward(compute_losses(engine(*batch), weights)["loss"])
            if step == 1:  # parameters, gradients and Adam's state are all held here
                held = held_bytes(engine)
            engine.step()
        with open(os.path.join(out_dir, f"stage{stage}-rank{rank}.json"), "w") as f:
            json.dump({"psi": psi, "held": held}, f)
    finally:
        dist.barrier()  # no rank tears gloo down while its peer may still be talking to it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (`mmray model list`)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.multiprocessing as mp

    overrides = [f"model.preset={args.preset}", f"data.image_size={args.image_size}",
                 f"train.micro_batch_size={args.micro_batch}", "train.max_steps=10", "train.warmup_steps=1"]
    n = args.workers
    stages = []
    with tempfile.TemporaryDirectory(prefix="mmray-bench-zero-") as out_dir:
        for stage in STAGES:
            mp.spawn(_worker, args=(n, _free_port(), stage, overrides, out_dir), nprocs=n, join=True)
            ranks = []
            for rank in range(n):
                with open(os.path.join(out_dir, f"stage{stage}-rank{rank}.json")) as f:
                    ranks.append(json.load(f))
            psi = ranks[0]["psi"]
            worst = max((r["held"] for r in ranks), key=lambda h: h["model_states"])
            formulas = {name: formula_bytes(stage, psi, n, *v) for name, v in VARIANTS.items()}
            goal = formulas[GOAL_VARIANT]
            stages.append({
                "stage": stage, "psi": psi, "per_rank": [r["held"] for r in ranks],
                "formula_bytes": {name: {k: round(v) for k, v in f.items()} for name, f in formulas.items()},
                "measured_over_formula": {
                    name: round(worst["model_states"] / f["total"], 4) for name, f in formulas.items()},
                "components_over_fp32_formula": {
                    k: round(worst[k] / goal[k], 4) for k in ("params", "grads", "optimizer")},
                "measured_in_psi": {k: round(worst[k] / psi, 3) for k in ("params", "grads", "optimizer",
                                                                          "model_states")},
                "within_goal": abs(worst["model_states"] / goal["total"] - 1) <= GOAL_TOLERANCE,
            })
    print(json.dumps({
        "benchmark": "zero_memory", "preset": args.preset, "workers": n, "precision": "fp32",
        "optimizer": "torch AdamW", "measured_at": "after the backward of step 2, before its update",
        "goal": {"variant": GOAL_VARIANT, "tolerance": GOAL_TOLERANCE},
        "formulas_in_psi": {
            name: {f"zero{s}": f"{(v[0] if s < 3 else 0) + (v[1] if s < 2 else 0) + (v[2] if s < 1 else 0)} Psi + "
                               f"{(v[0] if s >= 3 else 0) + (v[1] if s >= 2 else 0) + (v[2] if s >= 1 else 0)} Psi/N"
                   for s in STAGES} for name, v in VARIANTS.items()},
        "stages": stages,
    }))


if __name__ == "__main__":
    main()
