"""`mmray plan`: before any money is spent, what a config costs on each instance type, and which plan to take.

For every GPU instance type of the price table, on spot and on demand, the planner works out the time and the
dollars to train ``train.max_steps x global batch`` samples with ``train.num_workers`` workers (one GPU each), the
memory each GPU needs, and picks the cheapest plan that fits in GPU memory, in the instance's vCPUs and in
``budget.usd``. The arithmetic, all of it here and tested by hand-computed cases (tests/unit/test_planner.py):

    samples      = max_steps * micro_batch_size * grad_accum * num_workers
    nodes        = ceil(num_workers / gpus per instance)           (whole instances are paid, idle GPUs too)
    throughput   = num_workers * samples/s per GPU                  (perfect data-parallel scaling assumed)
    hours        = samples / throughput / 3600
    $/hour       = nodes * price(instance, market) + price(head, on-demand)
    cost         = hours * $/hour

Samples/s per GPU, in order of preference:
  1. measured: ``--samples-per-s-per-gpu X`` measured on GPU type ``--measured-on`` (default the reference A10G),
     carried to the other GPU types by the ratio of their peak BF16 TFLOPS (price table ``gpu_types``);
  2. estimated from FLOPs: ``bf16_tflops * 1e12 * mfu / train_flops_per_sample`` (``mmray model info``'s FLOPs; an
     assumed model-FLOPs utilisation, ``--mfu``, default 0.3, typical of well-fed mid-size Transformers).
  ``--calibrate`` times a few forward/backward steps of the configured model on this machine's CPU: it proves the
  model builds and runs at this micro-batch and gives a measured figure for a ``local`` (CPU) plan. It says nothing
  about GPUs, so GPU plans still use 1 or 2.
Spot plans ignore the work lost to preemptions (at most one checkpoint interval each with emergency checkpoints).

Memory per GPU (bytes), with P parameters, N = num_workers data-parallel ranks, Adam, after the ZeRO paper
(Rajbhandari et al. 2020), mixed precision (bf16/fp16: 2 B weights + 2 B grads + 12 B fp32 master, momentum,
variance = 16P; fp32: 4 + 4 + 8 = 16P):
    stage 0: p+g+o         (16P)          stage 2: p + (g+o)/N    (2P + 14P/N)
    stage 1: p + g + o/N   (4P + 12P/N)   stage 3: (p+g+o)/N      (16P/N)
train.offload_optimizer=cpu takes o (and at stages 2-3 the gradient partition) off the GPU; train.offload_param=cpu
(ZeRO-3) takes the parameter partition off too.
plus activations of one micro-batch, per Transformer layer ``s*b*h*(34 + 5*a*s/h)`` bytes at 16 bits
(Korthikanti et al. 2022, no recomputation; x2 at fp32) for s tokens, b samples, width h, a heads (with
train.activation_checkpointing, ``2*s*b*h`` per layer plus the largest layer's full activations): image tower
layers at s = (image_size/patch)^2 + 1, text tower, attention-fusion and decoder layers at s = max_text_len; the
decoder adds fp32 logits and their gradient, 8*b*s*vocab; with image-text matching (two extra fused passes over the
negatives) the activations are multiplied by 3. Plus 1 GiB for the CUDA context and allocator. A plan fits when the
total is at most 90% of the GPU's memory. Temporary buffers (ZeRO-3 gathers, comm buckets) are not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mmray.config import Config, ConfigError
from mmray.cost.prices import LOCAL, PriceTable

DEFAULT_MFU = 0.3
REFERENCE_GPU = "A10G"
MEMORY_HEADROOM = 0.9            # a plan fits when its estimate is at most this fraction of the GPU's memory
OVERHEAD_BYTES = 1 << 30          # CUDA context, allocator, framework buffers
DEFAULT_READER_PARALLELISM = 2    # concurrent read tasks per training worker the shard count should allow
GIB = float(1 << 30)

# (weights, gradients, optimizer states) bytes per parameter
_STATE_BYTES = {"mixed": (2, 2, 12), "fp32": (4, 4, 8)}


# ------------------------------------------------------------------------------------------------------ memory

def model_state_bytes(params: int, zero_stage: int, dp: int, precision: str = "bf16", *,
                      offload_optimizer: bool = False, offload_param: bool = False) -> float:
    """Bytes per GPU of weights, gradients and Adam states under ZeRO ``zero_stage`` over ``dp`` ranks.

    ``offload_optimizer`` (ZeRO-Offload) moves the optimizer states to host memory, and at stages 2 and 3 the
    gradient partition too (stage 1 keeps whole gradients until they are reduced); ``offload_param`` (ZeRO-3 only)
    moves the parameter partition."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    p, g, o = (b * params for b in _STATE_BYTES["fp32" if precision == "fp32" else "mixed"])
    p, g, o = {0: (p, g, o), 1: (p, g, o / dp), 2: (p, g / dp, o / dp), 3: (p / dp, g / dp, o / dp)}[zero_stage]
    if offload_optimizer:
        o, g = 0.0, g if zero_stage < 2 else 0.0
    if offload_param:
        p = 0.0
    return p + g + o


def layer_activation_bytes(tokens: int, batch: int, width: int, heads: int, recompute: bool = False) -> float:
    """One Transformer layer's saved activations at 16 bits (Korthikanti et al. 2022, eq. 1, no recomputation);
    with ``recompute`` (full activation checkpointing) only the layer's input, ``2*s*b*h``."""
    if recompute:
        return 2 * tokens * batch * width
    return tokens * batch * width * (34 + 5 * heads * tokens / width)


def activation_bytes(cfg: Config, vocab_size: int, itm: bool, precision: str = "bf16") -> float:
    """Activations of one micro-batch on one GPU (see the module docstring)."""
    m, b = cfg.model, cfg.train.micro_batch_size
    recompute = cfg.train.activation_checkpointing
    image_tokens = (cfg.data.image_size // m.patch_size) ** 2 + 1
    text_tokens = cfg.data.max_text_len
    text_layers = m.text_depth + m.decoder_depth + (m.fusion_depth if m.fusion == "attention" else 0)
    total = m.image_depth * layer_activation_bytes(image_tokens, b, m.image_width, m.image_heads, recompute)
    total += text_layers * layer_activation_bytes(text_tokens, b, m.text_width, m.text_heads, recompute)
    if recompute:  # plus the one layer whose activations backward recomputes at a time
        total += max(layer_activation_bytes(image_tokens, b, m.image_width, m.image_heads),
                     layer_activation_bytes(text_tokens, b, m.text_width, m.text_heads))
    if precision == "fp32":
        total *= 2
    if m.decoder_depth:
        total += 8 * b * text_tokens * vocab_size
    return total * (3 if itm else 1)


def memory_per_gpu(cfg: Config, params: int, vocab_size: int, itm: bool, precision: str = "bf16") -> dict:
    """The per-GPU memory estimate, in GiB, by part."""
    t = cfg.train
    states = model_state_bytes(params, t.zero_stage, t.num_workers, precision,
                               offload_optimizer=t.offload_optimizer != "none", offload_param=t.offload_param != "none")
    acts = activation_bytes(cfg, vocab_size, itm, precision)
    return {"model_states_gib": states / GIB, "activations_gib": acts / GIB, "overhead_gib": OVERHEAD_BYTES / GIB,
            "total_gib": (states + acts + OVERHEAD_BYTES) / GIB, "zero_stage": cfg.train.zero_stage,
            "precision": precision}


def gpu_precision(cfg: Config) -> str:
    """What the run computes in on a GPU: 'auto' means bf16 there."""
    return "bf16" if cfg.train.precision == "auto" else cfg.train.precision


# ------------------------------------------------------------------------------------------------------ throughput

def samples_target(cfg: Config) -> int:
    """Samples the run trains: max_steps x global batch."""
    return cfg.train.max_steps * cfg.train.global_batch()


def per_gpu_throughput(table: PriceTable, gpu_type: str, *, samples_per_s_per_gpu: float | None = None,
                       measured_on: str = REFERENCE_GPU, flops_per_sample: float | None = None,
                       mfu: float = DEFAULT_MFU) -> tuple[float, str]:
    """Samples/s on one GPU of ``gpu_type`` and how it was obtained (see the module docstring)."""
    tflops = table.gpu_types[gpu_type].bf16_tflops
    if samples_per_s_per_gpu is not None:
        ref = table.gpu_types[measured_on].bf16_tflops
        return samples_per_s_per_gpu * tflops / ref, f"measured on {measured_on}, scaled by peak BF16 TFLOPS"
    if not flops_per_sample:
        raise ValueError("need samples_per_s_per_gpu or flops_per_sample")
    return tflops * 1e12 * mfu / flops_per_sample, f"FLOPs estimate at MFU {mfu:g}"


# ------------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on that is not in the config or the price table."""

    params: int
    vocab_size: int
    itm: bool
    flops_per_sample: float | None = None
    samples_per_s_per_gpu: float | None = None
    measured_on: str = REFERENCE_GPU
    mfu: float = DEFAULT_MFU
    cpu_samples_per_s: float | None = None  # from --calibrate: a `local` (CPU) plan
    head: str | None = None                 # head instance type; None: the table's; "none" or "": no head


def plan_rows(cfg: Config, table: PriceTable, inputs: PlanInputs) -> list[dict]:
    """One row per (GPU instance type, market), plus a `local` row when a CPU calibration was given."""
    t = cfg.train
    samples = samples_target(cfg)
    head_name = table.head_instance_type if inputs.head is None else inputs.head
    head_usd = table.get(head_name).on_demand_usd_per_hour if head_name not in ("", "none") else 0.0
    memory = memory_per_gpu(cfg, inputs.params, inputs.vocab_size, inputs.itm, gpu_precision(cfg))
    rows = []
    for inst in table.instances.values():
        if inst.gpus == 0:
            continue
        sps, method = per_gpu_throughput(table, inst.gpu_type, samples_per_s_per_gpu=inputs.samples_per_s_per_gpu,
                                         measured_on=inputs.measured_on, flops_per_sample=inputs.flops_per_sample,
                                         mfu=inputs.mfu)
        nodes = math.ceil(t.num_workers / inst.gpus)
        cpus_needed = min(t.num_workers, inst.gpus) * t.cpus_per_worker
        for market in ("spot", "on-demand"):
            rows.append(_row(inst.name, market, nodes, inst.gpus, inst.gpu_type, sps, method, samples, t.num_workers,
                             nodes * inst.usd_per_hour(market) + head_usd, memory["total_gib"],
                             inst.gpu_memory_gib, cpus_needed <= inst.vcpus, cfg.budget.usd))
    if inputs.cpu_samples_per_s:
        local = table.get(LOCAL)
        rows.append(_row(LOCAL, "on-demand", 1, 0, "cpu", inputs.cpu_samples_per_s / t.num_workers,
                         "measured on this machine's CPU (--calibrate)", samples, t.num_workers,
                         local.on_demand_usd_per_hour, None, None, True, cfg.budget.usd))
    return rows


def _row(instance: str, market: str, nodes: int, gpus: int, gpu_type: str, sps_per_worker: float, method: str,
         samples: int, workers: int, usd_per_hour: float, need_gib: float | None, have_gib: float | None,
         fits_cpu: bool, budget_usd: float) -> dict:
    seconds = samples / (workers * sps_per_worker)
    usd = usd_per_hour * seconds / 3600.0
    fits_memory = need_gib is None or need_gib <= MEMORY_HEADROOM * have_gib
    fits_budget = budget_usd <= 0 or usd <= budget_usd
    return {"instance_type": instance, "market": market, "nodes": nodes, "gpus_per_node": gpus, "gpu_type": gpu_type,
            "samples_per_s_per_gpu": sps_per_worker, "samples_per_s": workers * sps_per_worker,
            "throughput_from": method, "hours": seconds / 3600.0, "usd_per_hour": usd_per_hour, "usd": usd,
            "memory_gib_needed": need_gib, "memory_gib_per_gpu": have_gib, "fits_memory": fits_memory,
            "fits_cpu": fits_cpu, "fits_budget": fits_budget, "ok": fits_memory and fits_budget and fits_cpu}


def choose(rows: list[dict]) -> dict | None:
    """The cheapest row that fits (memory, CPUs, budget); the faster one on a tie; None if none fits."""
    fitting = [r for r in rows if r["ok"]]
    return min(fitting, key=lambda r: (r["usd"], r["hours"])) if fitting else None


def check_shards(shards: int | None, workers: int, reader_parallelism: int) -> dict:
    """A shard is the smallest unit of a read task: fewer than workers x parallelism leaves readers idle."""
    need = workers * reader_parallelism
    if shards is None:
        return {"shards": None, "needed": need, "ok": None}
    return {"shards": shards, "needed": need, "ok": shards >= need}


def plan(cfg: Config, table: PriceTable, inputs: PlanInputs, shards: dict | None = None) -> dict:
    """The JSON summary of `mmray plan`."""
    rows = plan_rows(cfg, table, inputs)
    t = cfg.train
    return {"samples": samples_target(cfg), "global_batch": t.global_batch(),
            "workers": t.num_workers, "params": inputs.params, "flops_per_sample": inputs.flops_per_sample,
            "budget_usd": cfg.budget.usd,
            "memory": memory_per_gpu(cfg, inputs.params, inputs.vocab_size, inputs.itm, gpu_precision(cfg)),
            "shards": shards, "rows": rows, "choice": choose(rows),
            "prices": {"as_of": table.as_of, "source": table.source, "path": table.path}}


# ------------------------------------------------------------------------------------------------------ gathering

def model_facts(cfg: Config, vocab_size: int) -> tuple[int, float, bool]:
    """(parameters, training FLOPs per sample, trains ITM) of the configured model, counted on the meta device."""
    from mmray.models.info import build_on_meta, parameter_counts, train_flops_per_sample
    from mmray.models.objectives import objective_weights
    from mmray.models.presets import Inputs as ModelInputs

    inputs = ModelInputs(cfg.data.image_size, cfg.data.max_text_len, vocab_size)
    model = build_on_meta(cfg.model, inputs)
    return (parameter_counts(model)["total"], float(train_flops_per_sample(model, inputs)),
            objective_weights(cfg.model).get("itm", 0) > 0)


def _s3_unreachable(path: str) -> str | None:
    """Why the bucket of ``path`` cannot be reached quickly, or None. A short boto3 probe first, because pyarrow's S3
    client retries an unreachable endpoint for minutes (and waits for it again at interpreter exit)."""
    import boto3
    from botocore.config import Config as BotoConfig

    from mmray import storage

    bucket = path[len(storage.S3_SCHEME):].split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=storage.endpoint_from_env(), config=BotoConfig(
        connect_timeout=3, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}))
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # no network, no credentials, no bucket: all mean "cannot count the shards"
        return f"{type(e).__name__}: {e}"
    return None


def data_facts(cfg: Config) -> tuple[int, int | None, str]:
    """(vocabulary size, training shards or None, where they come from), without generating or downloading data."""
    import inspect

    from mmray import storage
    from mmray.data import sources
    from mmray.data.prepare import is_prepared, prepare_synthetic
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.presets import REFERENCE_INPUTS
    from mmray.train.trainer import synthetic_dir

    vocab = REFERENCE_INPUTS.get(cfg.model.preset, REFERENCE_INPUTS["tiny"]).vocab_size
    d = cfg.data
    root = synthetic_dir(cfg) if d.source.startswith("synthetic:") else d.source
    why = _s3_unreachable(root) if storage.is_s3(root) else None
    if why:
        return vocab, None, f"unknown ({root} not reachable: {why})"
    try:
        if is_prepared(root) or not d.source.startswith("synthetic:"):
            parts = sources.parts(root)
            shards = sum(len(part.shards("train", d.allow_missing_shards)) for part in parts)
            prepared = [part.spec for part in parts if part.prepared]
            tokenizer = d.tokenizer or (storage.join(prepared[0], "tokenizer.json") if prepared else "")
            if tokenizer and storage.exists(tokenizer):
                vocab = TextTokenizer.from_file(tokenizer).vocab_size
            return vocab, shards, f"counted in {root} (training shards)"
    except (OSError, ValueError) as e:  # missing, unreachable or unreadable: say so, do not fail the plan
        return vocab, None, f"unknown ({e})"
    per_shard = inspect.signature(prepare_synthetic).parameters["samples_per_shard"].default
    shards = math.ceil((d.synthetic_samples - d.synthetic_val_samples) / per_shard)
    return vocab, shards, f"predicted for {d.source} (generated on the first run, {per_shard} samples per shard)"


def calibrate(cfg: Config, vocab_size: int, steps: int = 3) -> dict:
    """Time ``steps`` forward/backward/AdamW steps of the configured model at ``train.micro_batch_size`` on CPU
    (after one untimed warm-up step). Returns samples/s of one process."""
    import torch

    from mmray.losses import compute_losses
    from mmray.models.model import MultimodalModel
    from mmray.models.objectives import objective_weights

    if steps < 1:
        raise ConfigError(f"--calibrate-steps must be at least 1, got {steps}")
    torch.manual_seed(0)
    b = cfg.train.micro_batch_size
    model = MultimodalModel(cfg.model, vocab_size, 0, cfg.data.image_size, cfg.data.max_text_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = objective_weights(cfg.model)
    images = torch.randn(b, 3, cfg.data.image_size, cfg.data.image_size)
    ids = torch.randint(1, vocab_size, (b, cfg.data.max_text_len))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        compute_losses(model(images, ids), weights)["loss"].backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"device": "cpu", "steps": steps, "micro_batch_size": b, "seconds": seconds,
            "samples_per_s": steps * b / seconds, "threads": torch.get_num_threads()}


def format_table(summary: dict) -> str:
    """The human table of `mmray plan` (stderr)."""
    head = (f"{'instance':14s} {'market':9s} {'nodes':>5s} {'gpu':>12s} {'samples/s':>10s} {'hours':>9s} "
            f"{'$/hour':>8s} {'cost $':>10s} {'GiB need/have':>14s}  fits")
    lines = [head, "-" * len(head)]
    choice = summary["choice"]
    for r in sorted(summary["rows"], key=lambda r: r["usd"]):
        mem = ("-" if r["memory_gib_needed"] is None else
               f"{r['memory_gib_needed']:.1f}/{r['memory_gib_per_gpu']:.0f}")
        why = "yes" if r["ok"] else ",".join(k[5:] for k in ("fits_memory", "fits_cpu", "fits_budget") if not r[k])
        if not r["ok"]:
            why = "no: " + why
        mark = " <- cheapest that fits" if choice is r else ""
        gpu = f"{r['gpus_per_node']}x{r['gpu_type']}" if r["gpus_per_node"] else r["gpu_type"]
        lines.append(f"{r['instance_type']:14s} {r['market']:9s} {r['nodes']:5d} {gpu:>12s} "
                     f"{r['samples_per_s']:10.1f} {r['hours']:9.3f} {r['usd_per_hour']:8.3f} {r['usd']:10.3f} "
                     f"{mem:>14s}  {why}{mark}")
    return "\n".join(lines)
