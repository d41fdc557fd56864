"""The per-worker training loop that Ray Train runs on every rank: DeepSpeed engine, streaming batches, checkpoints.

Small named steps, after Ray's DeepSpeed example: build the engine, restore, train, evaluate, report.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mmray import config as config_lib
from mmray.eval.retrieval import retrieval_metrics
from mmray.losses import compute_losses
from mmray.models.model import MultimodalModel
from mmray.models.objectives import objective_weights
from mmray.train.checkpoint import Checkpointer, log_line


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        log_line(msg)


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.array(batch["image"], copy=True)).to(device)  # Ray hands read-only arrays
    ids = torch.from_numpy(np.ascontiguousarray(batch["text_ids"])).to(device)
    return images, ids


def _mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def data_quality(quality, max_bad_fraction: float, rank: int) -> dict:
    """Rank 0 reads the pipeline's good/bad sample counts and shares them, so that every rank takes the same decision:
    all ranks raise together when the bad fraction exceeds the limit (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    from mmray.data.pipeline import check_quality, quality_snapshot

    snapshot = [quality_snapshot(quality) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(snapshot, src=0)
    check_quality(snapshot[0], max_bad_fraction)
    return snapshot[0]


def evaluate(engine, cfg: config_lib.Config, device: torch.device) -> dict[str, float]:
    """Held-out metrics for whatever the fusion strategy provides: retrieval R@k (contrastive embeddings), ITM
    accuracy on matching pairs and mined hard negatives, and caption token loss (decoder).

    Every rank sees the whole split and runs the same forwards (ZeRO-3 needs all ranks in each forward), so every
    rank computes identical metrics.
    """
    import ray.train

    from mmray.losses import caption_loss

    images, texts, captions = [], [], []
    itm_correct = itm_total = 0
    caption_sum, caption_batches = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.eval.batch_size,
                                                                      batch_format="numpy"):
            out = engine(*_to_tensors(batch, device))
            captions.extend(str(c) for c in batch["caption"])
            if "image_embeds" in out:
                images.append(out["image_embeds"].float().cpu())
                texts.append(out["text_embeds"].float().cpu())
            if "itm_logits" in out:
                itm_correct += int((out["itm_logits"].argmax(-1) == out["itm_labels"]).sum())
                itm_total += len(out["itm_labels"])
            if "caption_logits" in out:
                caption_sum += float(caption_loss(out["caption_logits"], out["caption_targets"]))
                caption_batches += 1
    engine.train()
    if not captions:
        raise ValueError("the validation split is empty; nothing to evaluate")
    metrics: dict[str, float] = {"eval_pairs": len(captions)}
    if images:
        metrics.update(retrieval_metrics(torch.cat(images), torch.cat(texts), captions))
    if itm_total:
        metrics["itm_acc"] = itm_correct / itm_total
    if caption_batches:
        metrics["caption_loss"] = caption_sum / caption_batches
    return {f"val_{k}": v for k, v in metrics.items()}


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. ``loop_config`` holds the resolved config and tokenizer facts."""
    import ray.train

    cfg = config_lib.from_dict(loop_config["config"])
    on_gpu = bool(loop_config["use_gpu"]) and torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    from mmray.train.engine import build_engine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    model = MultimodalModel(cfg.model, loop_config["vocab_size"], loop_config["pad_id"], cfg.data.image_size,
                            cfg.data.max_text_len)
    engine = build_engine(model, cfg, world, on_gpu)
    weights = objective_weights(cfg.model)
    device = engine.device
    extra = {"config.yaml": cfg.to_yaml(), "tokenizer.json": loop_config["tokenizer_json"]}
    checkpoints = Checkpointer(engine, rank, world, extra)
    state = checkpoints.restore()
    resumed_from = state["step"]
    if state["step"]:
        _log(rank, f"resumed at step {state['step']} from {checkpoints.restored_from} "
                   f"({state['samples_seen']} samples seen)")
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    t = cfg.train
    trained_here = False

    shard = ray.train.get_dataset_shard("train")
    window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
    while state["step"] < t.max_steps:
        batches_this_epoch = 0
        for batch in shard.iter_batches(batch_size=t.micro_batch_size, drop_last=True, batch_format="numpy",
                                        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                        local_shuffle_seed=t.seed + 1000 * state["epoch"] + rank):
            batches_this_epoch += 1
            outputs = engine(*_to_tensors(batch, device))
            losses = compute_losses(outputs, weights)
            engine.backward(losses["loss"])
            engine.step()
            window_loss += float(losses["loss"].detach())
            window_n += 1
            if engine.global_steps == state["step"]:
                continue  # still accumulating micro-batches
            trained_here = True
            state["step"] = engine.global_steps
            state["samples_seen"] += global_batch
            done = state["step"] >= t.max_steps
            if state["step"] % t.log_every == 0 or done:
                elapsed = time.perf_counter() - window_t0
                metrics = {"step": state["step"], "epoch": state["epoch"], "samples_seen": state["samples_seen"],
                           "loss": _mean_across_ranks(window_loss / window_n),
                           "lr": engine.get_lr()[0],
                           "samples_per_s": window_n * t.micro_batch_size * world / max(elapsed, 1e-9)}
                if "logit_scale" in outputs:
                    metrics["temperature"] = 1.0 / float(outputs["logit_scale"].detach())
                if loop_config.get("quality") is not None:
                    quality = data_quality(loop_config["quality"], cfg.data.max_bad_fraction, rank)
                    metrics["bad_samples"] = sum(quality["bad"].values())
                _log(rank, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()))
                window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
            if done:
                break  # the final checkpoint is reported below, with the evaluation
            # A node drain (spot reclaim) is polled every log_every steps, on every rank alike (it is a barrier).
            emergency = state["step"] % t.log_every == 0 and checkpoints.preemption_notice()
            if emergency:
                state["emergency_checkpoints"] += 1
            if state["step"] % t.checkpoint_every == 0 or emergency:
                checkpoints.save(state, metrics if state["step"] % t.log_every == 0 else
                                 {"step": state["step"], "samples_seen": state["samples_seen"]})
            elif state["step"] % t.log_every == 0:
                ray.train.report(metrics)
        else:
            if batches_this_epoch == 0:
                from mmray.data.pipeline import BadDataError

                raise BadDataError(f"the training split yields no full batch of {t.micro_batch_size} per worker "
                                 f"({world} workers); use more data or a smaller train.micro_batch_size")
            state["epoch"] += 1

    _log(rank, "evaluating on the held-out split")
    metrics = {"step": state["step"], "samples_seen": state["samples_seen"], "resumed_from_step": resumed_from,
               "emergency_checkpoints": state["emergency_checkpoints"], **checkpoints.summary(),
               **evaluate(engine, cfg, device)}
    _log(rank, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val_")))
    # The final checkpoint carries the evaluation, so the run's result (and any later rerun) reports it. A rerun of
    # a finished run re-evaluates and reports under a fresh name, since checkpoint names must be unique.
    checkpoints.save(state, metrics, finished_rerun=not trained_here)
