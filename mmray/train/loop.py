"""The per-worker training loop that Ray Train runs on every rank: DeepSpeed engine, streaming batches, checkpoints.

Small named steps, after Ray's DeepSpeed example: build the engine, restore, train, evaluate, report.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mmray import config as config_lib
from mmray.data.position import ConsumedSamples
from mmray.data.tokenizer import TextTokenizer
from mmray.losses import compute_losses
from mmray.models.objectives import objective_weights
from mmray.train.checkpoint import BestPolicy, Checkpointer, log_line


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        log_line(msg)


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device, vqa: bool) -> tuple[torch.Tensor, ...]:
    """The model's inputs from a pipeline batch: images and caption ids, plus question and answer ids for VQA."""
    keys = ("image", "text_ids", "question_ids", "answer_ids") if vqa else ("image", "text_ids")
    return tuple(torch.from_numpy(np.array(batch[k], copy=True)).to(device) for k in keys)  # Ray: read-only


def _sum_across_ranks(value: float | int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=dtype)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return float(_sum_across_ranks(value, torch.float64).item()) / world


def data_quality(quality, max_bad_fraction: float, rank: int) -> dict:
    """Rank 0 reads the pipeline's good/bad sample counts and shares them, so that every rank takes the same decision:
    all ranks raise together when the bad fraction exceeds the limit (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    from mmray.data.pipeline import check_quality, quality_snapshot

    snapshot = [quality_snapshot(quality) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(snapshot, src=0)
    check_quality(snapshot[0], max_bad_fraction, "To train on the good samples regardless, raise data.max_bad_fraction "
                  "and run the same command again: the run continues from its last checkpoint, if any")
    return snapshot[0]


class _Budget:
    """The budget guard in the loop: rank 0 asks the run's cost meter and the guard, every rank gets the decision.

    Decisions are taken before training (a resumed run may already be at the cap), after the first step (the first
    measured step time) and after every checkpoint, each time projecting the steps up to the next checkpoint.
    """

    def __init__(self, meter, cfg: config_lib.Config, rank: int):
        from mmray.cost.budget import BudgetGuard

        self.meter, self.rank = meter, rank
        self.guard = BudgetGuard.for_budget(cfg.budget)
        self.mark_steps, self.mark_t = None, time.perf_counter()
        self.decision: dict = {}

    def observe(self, step: int) -> None:
        """Steps since the last decision and their wall time (data, logging and evaluation included)."""
        now = time.perf_counter()
        if self.mark_steps is not None:
            self.guard.observe_steps(step - self.mark_steps, now - self.mark_t)
        self.mark_steps, self.mark_t = step, now

    def should_stop(self, steps_next: int) -> bool:
        import ray
        import torch.distributed as dist

        decision = [None]
        if self.rank == 0:
            status = ray.get(self.meter.status.remote(), timeout=60)
            d = self.guard.check(status["spent_usd"], status["burn_usd_per_hour"], steps_next)
            decision = [d.to_dict()]
            if d.stop:
                log_line(d.reason)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        self.decision = decision[0]
        return bool(self.decision["stop"])


def evaluate(engine, cfg: config_lib.Config, device: torch.device, tokenizer) -> dict[str, float]:
    """Held-out metrics (mmray.eval.evaluate) on the "val" split, prefixed ``val_``.

    Every rank sees the whole split and runs the same forwards (ZeRO-3 needs all ranks in each forward), so every
    rank computes identical metrics. Under ZeRO-3, generation and zero-shot prompts run with the parameters
    gathered (GatheredParameters), since they call the model's parts outside its forward.
    """
    import ray.train

    from mmray.eval.evaluate import evaluate as evaluate_model

    gather = None
    if cfg.train.zero_stage == 3:
        import deepspeed

        gather = lambda: deepspeed.zero.GatheredParameters(list(engine.module.parameters()))  # noqa: E731
    batches = ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy")
    metrics = evaluate_model(engine.module, batches, tokenizer, cfg, device, forward_fn=engine, gather=gather)
    return {f"val_{k}": v for k, v in metrics.items()}


def _eval_line(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val_"))


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. ``loop_config`` holds the resolved config and tokenizer facts."""
    import ray.train

    cfg = config_lib.from_dict(loop_config["config"])
    on_gpu = bool(loop_config["use_gpu"]) and torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    from mmray.train.engine import build_engine, build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, loop_config["vocab_size"], loop_config["pad_id"], world, on_gpu)
    engine = build_engine(model, cfg, world, on_gpu)
    weights = objective_weights(cfg.model)
    vqa = "vqa" in weights
    tokenizer = TextTokenizer.from_str(loop_config["tokenizer_json"])
    device = engine.device
    extra = {"config.yaml": cfg.to_yaml(), "tokenizer.json": loop_config["tokenizer_json"]}
    position = loop_config.get("data_position")
    # the data position: what this rank trained on in the current epoch (rank 0: and the rows of the shards read)
    consumed = ConsumedSamples(rank, position if rank == 0 else None)
    checkpoints = Checkpointer(engine, rank, world, extra, loop_config.get("cost_meter"), data_position=consumed,
                               best=BestPolicy.from_config(cfg.run))
    state = checkpoints.restore()
    resumed_from, repeated_before = state["step"], state["samples_repeated"]
    if state["step"]:
        _log(rank, f"resumed at step {state['step']} from {checkpoints.restored_from} "
                   f"({state['samples_seen']} samples seen, {consumed.before.num_rows} of them in epoch "
                   f"{state['epoch']}, left out of its rest)")

    def count_repeats() -> None:  # a collective: called on every rank before every checkpoint
        state["samples_repeated"] = repeated_before + int(_sum_across_ranks(consumed.repeated).item())

    # Tests only: every rank exits abruptly after this step (and its checkpoint), as a crashed worker would.
    exit_at_step = int(os.environ.get("MMRAY_TEST_EXIT_AT_STEP", "0"))
    # The batch sizes DeepSpeed was configured with (engine.ds_config), so the pipeline feeds exactly what it expects.
    micro_batch, global_batch = engine.train_micro_batch_size_per_gpu(), engine.train_batch_size()
    t = cfg.train
    trained_here = False
    periodic_evals = 0  # evaluations every eval.every steps, in this attempt
    eval_s, started = 0.0, time.perf_counter()

    seen_at_start = state["samples_seen"]

    def report_progress(samples_per_s: float | None = None) -> None:
        """Hand the cost meter the progress (rank 0), for `mmray cost`'s forecast of the time and dollars to finish:
        at a log line its window's throughput (kept by the meter, saved with its next sample; not waited for); at the
        end this attempt's mean, saved and waited for, so that the run's cost.json has it when the driver stops the
        meter (see Checkpointer.tell_meter)."""
        if state["samples_seen"] == seen_at_start:
            return
        final = samples_per_s is None
        if final:
            samples_per_s = (state["samples_seen"] - seen_at_start) / max(time.perf_counter() - started - eval_s, 1e-9)
        # what is left at this attempt's batch size (a resumed run may train at another one)
        total = state["samples_seen"] + (t.max_steps - state["step"]) * global_batch
        checkpoints.tell_meter("report_progress", state["samples_seen"], samples_per_s, total, save=final,
                               wait=final, what="the progress (no forecast)")

    budget = _Budget(loop_config["cost_meter"], cfg, rank) if cfg.budget.usd > 0 else None
    stopped_for_budget = budget is not None and budget.should_stop(steps_next=0)
    if budget:
        budget.observe(state["step"])

    shard = ray.train.get_dataset_shard("train")
    window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
    while state["step"] < t.max_steps and not stopped_for_budget:
        batches_this_epoch = 0
        if position is not None and rank == 0:  # before any rank can start the epoch (the split waits for all)
            ray.get(position.set.remote(state["epoch"], consumed.before, consumed.shard_rows(state["epoch"])),
                    timeout=60)
        # The rows arrive shuffled, in an order fixed by (seed, epoch) that a resume keeps (mmray.data.position);
        # a local shuffle buffer here would make the order after a resume differ from the uninterrupted run's.
        for batch in shard.iter_batches(batch_size=micro_batch, drop_last=True, batch_format="numpy"):
            batches_this_epoch += 1
            outputs = engine(*_to_tensors(batch, device, vqa))
            losses = compute_losses(outputs, weights)
            engine.backward(losses["loss"])
            engine.step()
            consumed.add(batch["shard"], batch["key"])
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
                           "samples_per_s": window_n * micro_batch * world / max(elapsed, 1e-9)}
                if "logit_scale" in outputs:
                    metrics["temperature"] = 1.0 / float(outputs["logit_scale"].detach())
                if loop_config.get("quality") is not None:
                    quality = data_quality(loop_config["quality"], cfg.data.max_bad_fraction, rank)
                    metrics["bad_samples"] = sum(quality["bad"].values())
                _log(rank, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()))
                report_progress(metrics["samples_per_s"])
                window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
            if done:
                break  # the final checkpoint is reported below, with the evaluation
            logged = state["step"] % t.log_every == 0
            report = metrics if logged else {"step": state["step"], "samples_seen": state["samples_seen"]}
            evaluated = bool(cfg.eval.every) and state["step"] % cfg.eval.every == 0
            if evaluated:
                _log(rank, f"evaluating at step {state['step']}")
                t_eval = time.perf_counter()
                report = {**report, **evaluate(engine, cfg, device, tokenizer)}
                periodic_evals += 1
                eval_s += time.perf_counter() - t_eval
                _log(rank, _eval_line(report))
            # A node drain (spot reclaim) is polled every log_every steps, on every rank alike (it is a barrier).
            emergency = logged and checkpoints.preemption_notice()
            if emergency:
                state["emergency_checkpoints"] += 1
            saved = state["step"] % t.checkpoint_every == 0 or emergency
            if saved:
                t_save = time.perf_counter()
                count_repeats()
                checkpoints.save(state, {**report, "samples_repeated": state["samples_repeated"]})
                if budget:
                    budget.guard.observe_checkpoint(time.perf_counter() - t_save)
                if emergency:  # train no further: Ray Train restarts the run from this checkpoint
                    checkpoints.await_restart()
            elif logged or evaluated:
                ray.train.report(report)
            if budget and (saved or state["step"] == resumed_from + 1):
                budget.observe(state["step"])
                steps_next = min(t.checkpoint_every - state["step"] % t.checkpoint_every, t.max_steps - state["step"])
                if budget.should_stop(steps_next):
                    stopped_for_budget = True
                    break
            if state["step"] == exit_at_step:
                log_line(f"rank {rank}: exiting at step {state['step']} (MMRAY_TEST_EXIT_AT_STEP)")
                os._exit(1)
        else:
            if batches_this_epoch == 0 and not consumed.before.num_rows:  # (else: resumed at the end of an epoch)
                from mmray.data.pipeline import BadDataError

                raise BadDataError(f"the training split yields no full batch of {micro_batch} per worker "
                                 f"({world} workers); use more data or a smaller train.micro_batch_size")
            state["epoch"] += 1
            consumed.new_epoch()
            continue
        break  # the for loop broke: finished, or stopped for the budget

    if stopped_for_budget:
        # Checkpoint (under a fresh name when this step was just saved) and stop without evaluating.
        _log(rank, f"stopped for the budget at step {state['step']}: {budget.decision['reason']}")
        report_progress()
        count_repeats()
        checkpoints.save(state, {"step": state["step"], "samples_seen": state["samples_seen"],
                                 "samples_repeated": state["samples_repeated"],
                                 "stopped_for_budget": True, "budget": budget.decision,
                                 "resumed_from_step": resumed_from}, finished_rerun=not trained_here)
        return

    train_s = time.perf_counter() - started - eval_s  # training steps (and checkpoints) of this attempt
    report_progress()
    _log(rank, "evaluating on the held-out split")
    count_repeats()
    # The last logged training loss (of the final step) goes with the final checkpoint, which run.keep_best ranks.
    last_loss = {"loss": metrics["loss"]} if trained_here else {}
    metrics = {"step": state["step"], "samples_seen": state["samples_seen"],
               "samples_repeated": state["samples_repeated"], "resumed_from_step": resumed_from,
               "emergency_checkpoints": state["emergency_checkpoints"], "periodic_evals": periodic_evals,
               "train_s": round(train_s, 3),
               **last_loss, **checkpoints.summary(),
               **evaluate(engine, cfg, device, tokenizer)}
    _log(rank, _eval_line(metrics))
    # The final checkpoint carries the evaluation, so the run's result (and any later rerun) reports it. A rerun of
    # a finished run re-evaluates and reports under a fresh name, since checkpoint names must be unique.
    checkpoints.save(state, metrics, finished_rerun=not trained_here)
