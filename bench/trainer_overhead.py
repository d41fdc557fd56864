"""Trainer overhead: steady-state steps/s of mmray's trainer (Ray Train + Ray Data + DeepSpeed, 1 worker, ZeRO-0 and
ZeRO-2) against a bare PyTorch loop over the same model and batches, side by side in one run. Prints one JSON object.

Three paths, each at the same preset, micro-batch, seed and torch threads (``--threads``, which is also the Ray Train
worker's ``train.cpus_per_worker``):

- ``trainer``: :func:`mmray.train.trainer.train` on a local Ray, so the steps run in
  :func:`mmray.train.loop.train_loop_per_worker` exactly as under ``mmray train``: batches streamed by Ray Data from the
  shapes shards (decode, resize, tokenize in Ray Data tasks beside the worker), a DeepSpeed engine, the loss pulled to
  the host every step, ``ray.train.report`` and the preemption poll every ``train.log_every`` steps.
- ``engine``: the same DeepSpeed engine (:func:`mmray.train.engine.build_engine`) driven in this process over the
  preloaded batches, with no Ray at all: what DeepSpeed alone costs over the bare loop.
- ``bare``: plain PyTorch over the preloaded batches: forward, :func:`mmray.losses.compute_losses`, backward, gradient
  clipping, ``torch.optim.AdamW`` (the optimizer DeepSpeed builds on CPU, with the same parameter groups) and the same
  warm-up + cosine learning rate. This is the limit.

Steady state: each run trains ``(warmup_windows + windows) * log_every + 1`` steps and is timed in windows of
``log_every`` steps. The trainer's windows are the loop's own ``samples_per_s`` over each log interval (the time from
one log point to the next, so everything the loop does between them counts, reports included); the first
``--warmup-windows`` windows (worker start-up, engine build, the pipeline's first blocks) and the final step are left
out, and the other paths are timed over the same step ranges. The preloaded batches are the first ``--batches``
micro-batches of the same training split, through the same preprocessing, cycled.

Each path runs ``--repeats`` times, alternating. The headline ratio compares each path's fastest window (over all its
runs) with the bare loop's: on a shared machine other jobs only add time, and a cost the trainer pays in every
window (reports, data) is in its fastest window too. Each run's mean steps/s over its windows, and the ratios of
those per repeat, are given beside it.

    python bench/trainer_overhead.py --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time

import torch

STAGES = (0, 2)


def overrides(args, root: str, stage: int, name: str) -> list[str]:
    steps = (args.warmup_windows + args.windows) * args.log_every + 1
    return [f"model.preset={args.preset}", f"data.image_size={args.image_size}",
            f"train.micro_batch_size={args.micro_batch}", "train.num_workers=1",
            f"train.cpus_per_worker={args.threads}", f"train.zero_stage={stage}", f"train.max_steps={steps}",
            f"train.log_every={args.log_every}", f"train.checkpoint_every={steps}",
            f"train.warmup_steps={min(5, steps - 1)}", "eval.max_samples=64", f"run.storage_path={os.path.join(root, 'runs')}", f"run.name={name}"]


def steps_per_s(window_times: list[float], log_every: int) -> float:
    return len(window_times) * log_every / sum(window_times)


def preload(cfg, data, n: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``n`` micro-batches of the training split through mmray's pipeline, as the loop's tensors."""
    from mmray.data.pipeline import read_split
    from mmray.models.objectives import objective_weights
    from mmray.train.loop import _to_tensors

    vqa = "vqa" in objective_weights(cfg.model)
    it = read_split(data.train, cfg, data.tokenizer).iter_batches(
        batch_size=cfg.train.micro_batch_size, drop_last=True, batch_format="numpy")
    out = []
    for batch in it:
        out.append(_to_tensors(batch, torch.device("cpu"), vqa))
        if len(out) == n:
            break
    return out


def lr_lambda(cfg):
    """DeepSpeed's WarmupCosineLR (linear warm-up from 0, cosine to min_lr_ratio) as a LambdaLR factor."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def timed_loop(step_fn, batches, cfg, log_every: int, warmup_windows: int) -> list[float]:
    """Run cfg.train.max_steps steps; the wall times of the windows after the warm-up ones (the last step unused)."""
    windows, t0 = [], time.perf_counter()
    for step in range(1, cfg.train.max_steps + 1):
        step_fn(batches[(step - 1) % len(batches)])
        if step % log_every == 0:
            now = time.perf_counter()
            if step > warmup_windows * log_every:
                windows.append(now - t0)
            t0 = now
    return windows


def bare_run(cfg, vocab: int, pad: int, batches, args) -> list[float]:
    from mmray.losses import compute_losses
    from mmray.models.objectives import objective_weights
    from mmray.train.engine import build_model, param_groups

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab, pad, world=1, on_gpu=False)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay, t.layer_decay, t.lr), lr=t.lr, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    weights = objective_weights(cfg.model)

    def step(batch):
        loss = compute_losses(model(*batch), weights)["loss"]
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop pulls the loss to the host every step

    return timed_loop(step, batches, cfg, args.log_every, args.warmup_windows)


def engine_run(cfg, vocab: int, pad: int, batches, args) -> list[float]:
    from mmray.losses import compute_losses
    from mmray.models.objectives import objective_weights
    from mmray.train.engine import build_engine, build_model

    torch.manual_seed(cfg.train.seed)
    engine = build_engine(build_model(cfg, vocab, pad, world=1, on_gpu=False), cfg, world_size=1, on_gpu=False)
    weights = objective_weights(cfg.model)

    def step(batch):
        loss = compute_losses(engine(*batch), weights)["loss"]
        engine.backward(loss)
        engine.step()
        float(loss.detach())

    try:
        return timed_loop(step, batches, cfg, args.log_every, args.warmup_windows)
    finally:
        engine.destroy()
        del engine
        gc.collect()


def trainer_run(cfg, args) -> tuple[list[float], float]:
    """The steady-state windows of one real training run (from its reports), and the run's wall time."""
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    from mmray.train.trainer import train

    queue = Queue()

    class Windows(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if "samples_per_s" in m:
                queue.put((m["step"], m["samples_per_s"]))

    t0 = time.perf_counter()
    summary = train(cfg, callbacks=[Windows()])
    wall = time.perf_counter() - t0
    reports = [queue.get() for _ in range(queue.qsize())]
    queue.shutdown()
    assert summary["steps"] == cfg.train.max_steps, summary
    mb = cfg.train.micro_batch_size
    windows = [args.log_every * mb / rate for step, rate in sorted(reports)
               if step > args.warmup_windows * args.log_every]
    assert len(windows) == args.windows, (reports, args)
    return windows, wall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every path (the worker's CPUs)")
    p.add_argument("--log-every", type=int, default=10, help="steps per timed window (the trainer reports each)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per run")
    p.add_argument("--warmup-windows", type=int, default=1, help="windows left out at the start of each run")
    p.add_argument("--batches", type=int, default=16, help="distinct preloaded batches the in-process paths cycle")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-engine", action="store_true", help="skip the in-process DeepSpeed engine path")
    p.add_argument("--out", default=None, help="runs directory (default: a temporary one)")
    args = p.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import torch.distributed as dist

    from mmray import config
    from mmray.models.objectives import objective_weights
    from mmray.train.trainer import resolve_data

    root = args.out or tempfile.mkdtemp(prefix="mmray-bench-overhead-")
    base = config.load(None, overrides(args, root, 0, "x"))
    data = resolve_data(base)  # the default shapes set, generated into the cache once (not timed)
    # as `mmray train` sizes a local Ray: the worker's CPUs plus room for the data pipeline
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.threads + 2), include_dashboard=False,
             log_to_driver=False)
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)  # the engine path's one-rank group
    vocab, pad = data.tokenizer.vocab_size, data.tokenizer.pad_id
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    try:
        batches = preload(base, data, args.batches)
        runs: dict[str, list[dict]] = {"bare": []}
        for stage in STAGES:
            runs[f"trainer_zero{stage}"] = []
            if not args.no_engine:
                runs[f"engine_zero{stage}"] = []
        for r in range(args.repeats):
            w = bare_run(base, vocab, pad, batches, args)
            runs["bare"].append({"steps_per_s": steps_per_s(w, args.log_every), "windows_s": w})
            for stage in STAGES:
                cfg = config.load(None, overrides(args, root, stage, f"zero{stage}-r{r}"))
                if not args.no_engine:
                    w = engine_run(cfg, vocab, pad, batches, args)
                    runs[f"engine_zero{stage}"].append({"steps_per_s": steps_per_s(w, args.log_every), "windows_s": w})
                w, wall = trainer_run(cfg, args)
                runs[f"trainer_zero{stage}"].append({"steps_per_s": steps_per_s(w, args.log_every), "windows_s": w,
                                                     "run_wall_s": round(wall, 1)})
    finally:
        dist.destroy_process_group()
        ray.shutdown()
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    # On a shared machine other jobs only ever add time, so each path's fastest window is its best estimate of the
    # steady state; a cost paid every window (a report, the data) is in every window, the fastest included.
    best = {k: args.log_every / min(w for v in vs for w in v["windows_s"]) for k, vs in runs.items()}
    ratios = {f"{k}_vs_bare": round(best[k] / best["bare"], 3) for k in best if k != "bare"}
    per_repeat = {f"{k}_vs_bare": [round(a["steps_per_s"] / b["steps_per_s"], 3) for a, b in zip(vs, runs["bare"])]
                  for k, vs in runs.items() if k != "bare"}
    for vs in runs.values():
        for v in vs:
            v["steps_per_s"] = round(v["steps_per_s"], 4)
            v["windows_s"] = [round(x, 2) for x in v["windows_s"]]
    print(json.dumps({
        "benchmark": "trainer_overhead", "preset": args.preset, "image_size": args.image_size,
        "micro_batch": args.micro_batch, "threads": args.threads, "workers": 1,
        "objectives": objective_weights(base.model),
        "steps_per_run": base.train.max_steps, "log_every": args.log_every, "warmup_windows": args.warmup_windows,
        "timed_steps_per_run": args.windows * args.log_every, "repeats": args.repeats,
        "best_window_steps_per_s": {k: round(v, 4) for k, v in best.items()}, "ratio_best_window": ratios,
        "ratio_per_repeat": per_repeat, "goal": {"trainer_vs_bare": 0.95}, "runs": runs,
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }))


if __name__ == "__main__":
    main()
