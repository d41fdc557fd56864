"""GPU MFU: samples/s and model-FLOPs utilisation of a CLIP preset's training step on one device, against the measured
peak of a large matmul on the same device in the same run. Prints one JSON object.

The step is mmray's model (:class:`mmray.models.model.MultimodalModel`, ``--preset``, its configured objectives, for
the CLIP presets the contrastive loss) on one device: forward and loss under ``torch.autocast`` (bf16 on GPU; fp32
without autocast on CPU), backward, and ``torch.optim.AdamW`` (fused on CUDA) over mmray's parameter groups. Inputs
are random tensors of the preset's reference shapes (``mmray model info``: 224 px, 77 tokens, 49,408-token vocabulary
for ViT-B-16), created on the device once: this measures the model's step, not the data pipeline.

- FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` around one real step (forward, loss and backward, every
  matmul, convolution and attention product; attention counted in full, causal or not; elementwise ops, norms,
  softmax and the optimizer are not counted). ``mmray model info``'s count on the meta device is given beside it.
  On CPU, PyTorch's flop counter has no formula for the CPU flash-attention kernel, so there the attention products are
  missing from the counter's figure (the meta count includes them).
- Peak: the best rate of ``--matmul-size``-square matmuls in the step's compute dtype (bf16 on GPU, fp32 on CPU),
  2 n^3 FLOPs each.
- Timing: ``--warmup`` steps, then ``--steps`` steps timed with CUDA events around the loop (``torch.cuda.synchronize``
  before reading them) on GPU, ``time.perf_counter`` on CPU; the loss is not pulled to the host inside the loop.

MFU = FLOPs per step x steps / seconds / peak FLOP/s. Goal (issue 5): >= 0.5 on an H200 for ViT-B-16 in bf16.

    python bench/gpu_mfu.py                                   # GPU: ViT-B-16, bf16, batch 256
    python bench/gpu_mfu.py --device cpu --preset tiny        # the CPU check: tiny preset, fp32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``fn``: CUDA events on GPU, perf_counter on CPU."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, trials: int = 3) -> float:
    """The best FLOP/s of ``reps`` back-to-back (n, n) @ (n, n) matmuls over ``trials`` trials (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def mm():
        torch.mm(a, b, out=c)

    timed(mm, 2, device)
    return max(2 * n ** 3 * reps / timed(mm, reps, device) for _ in range(trials))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    p.add_argument("--preset", default="ViT-B-16", help="model preset (`mmray model list`)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's reference inputs")
    p.add_argument("--text-len", type=int, default=None, help="default: the preset's reference inputs")
    p.add_argument("--vocab", type=int, default=None, help="default: the preset's reference inputs")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on GPU, 2 on CPU)")
    p.add_argument("--matmul-size", type=int, default=None, help="peak matmul side (default: 8192 GPU, 1024 CPU)")
    p.add_argument("--matmul-reps", type=int, default=None, help="matmuls per peak trial (default: 50 GPU, 10 CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not the default path)")
    args = p.parse_args()

    from mmray import config
    from mmray.losses import compute_losses
    from mmray.models.info import build_on_meta, train_flops_per_sample
    from mmray.models.model import MultimodalModel
    from mmray.models.objectives import objective_weights
    from mmray.models.presets import REFERENCE_INPUTS, Inputs
    from mmray.train.engine import param_groups

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.threads and not gpu:
        torch.set_num_threads(args.threads)
    precision = ("bf16" if gpu else "fp32") if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch = args.batch or (256 if gpu else 16)
    steps, warmup = args.steps or (30 if gpu else 5), args.warmup if args.warmup is not None else (10 if gpu else 2)
    if args.preset not in REFERENCE_INPUTS:
        raise SystemExit(f"--preset {args.preset!r}: choose from {', '.join(REFERENCE_INPUTS)}")
    ref = REFERENCE_INPUTS[args.preset]
    inputs = Inputs(image_size=args.image_size or ref.image_size, context_length=args.text_len or ref.context_length,
                    vocab_size=args.vocab or ref.vocab_size)

    cfg = config.load(None, [f"model.preset={args.preset}", f"data.image_size={inputs.image_size}",
                             f"data.max_text_len={inputs.context_length}"])
    torch.manual_seed(cfg.train.seed)
    model = MultimodalModel(cfg.model, inputs.vocab_size, 0, inputs.image_size, inputs.context_length).to(device)
    step_model = torch.compile(model) if args.compile else model
    weights = objective_weights(cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay, lr=t.lr), lr=t.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=gpu)
    images = torch.randn(batch, 3, inputs.image_size, inputs.image_size, device=device)
    ids = torch.randint(1, inputs.vocab_size, (batch, inputs.context_length), device=device)
    losses = []

    def step(m: torch.nn.Module = step_model) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = compute_losses(m(images, ids), weights)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    step()  # the first step allocates the optimizer's state (and compiles, with --compile)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # eager: compiled kernels bypass the counter
        step(model)
    flops_per_step = counter.get_total_flops()
    meta_flops_per_step = train_flops_per_sample(build_on_meta(cfg.model, inputs), inputs) * batch
    timed(step, warmup, device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, steps, device)
    peak_mem = torch.cuda.max_memory_allocated(device) if gpu else None
    final_loss = float(losses[-1])
    losses.clear()
    del opt, images, ids

    n = args.matmul_size or (8192 if gpu else 1024)
    peak = matmul_peak(device, dtype, n, args.matmul_reps or (50 if gpu else 10))
    achieved = flops_per_step * steps / seconds
    print(json.dumps({
        "benchmark": "gpu_mfu", "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch": torch.__version__, "threads": None if gpu else torch.get_num_threads(), "preset": args.preset,
        "precision": precision + (" autocast" if precision == "bf16" else ""), "compile": args.compile,
        "inputs": {"image_size": inputs.image_size, "context_length": inputs.context_length,
                   "vocab_size": inputs.vocab_size}, "objectives": weights,
        "params": sum(p.numel() for p in model.parameters()), "batch": batch, "warmup_steps": warmup + 2,
        "timed_steps": steps, "seconds": round(seconds, 4), "step_ms": round(1000 * seconds / steps, 2),
        "samples_per_s": round(batch * steps / seconds, 2),
        "flops_per_step": flops_per_step, "flops_per_step_meta_count": meta_flops_per_step,
        "achieved_tflops": round(achieved / 1e12, 4),
        "peak_matmul": {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(peak / 1e12, 4)},
        "mfu": round(achieved / peak, 4), "goal_mfu": 0.5 if gpu else None,
        "max_memory_allocated_gib": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
        "final_loss": round(final_loss, 4),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if os.name == "posix"
        else None,
    }))


if __name__ == "__main__":
    main()
