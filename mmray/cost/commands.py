"""The `mmray plan` and `mmray cost` subcommands: parsing and printing only (mmray/cli.py calls :func:`register`).

Like every mmray command, they log for humans on stderr and return the JSON summary that the CLI prints as the last
stdout line; bad input (config, flags, a missing cost.json) raises ConfigError / StorageError: exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from mmray import config as config_lib

PLAN_HELP = """\
Before any money is spent: for every GPU instance type of the price table, on spot and on demand, the time and
the cost to train train.max_steps x global batch samples with train.num_workers GPUs, the memory each GPU needs
(preset, ZeRO stage, micro-batch), whether the data has enough shards for the workers, and the cheapest plan that
fits the memory and budget.usd. Throughput comes from --samples-per-s-per-gpu (measured, e.g. by a bench/ script)
or from the model's FLOPs at an assumed MFU; --calibrate also times the model on this CPU. The price table is the
packaged one merged with budget.prices or $MMRAY_PRICES. Method and assumptions: mmray/cost/planner.py.
"""

COST_HELP = """\
Spend of a run from RUN_DIR/cost.json (written by the run's cost meter): dollars spent, the current burn rate,
and the time and dollars to finish from the last reported throughput; --plot writes a PNG of spend over time
against the budget (local path or s3://).
"""


def cmd_plan(args: argparse.Namespace) -> dict:
    from mmray.cost import planner, prices

    cfg = config_lib.load(args.config, args.overrides)
    table = prices.load(cfg.budget.prices)
    if args.measured_on not in table.gpu_types:
        raise config_lib.ConfigError(f"--measured-on {args.measured_on!r} is not a GPU type of the price table; "
                                     f"allowed: {', '.join(table.gpu_types)}.")
    if args.samples_per_s_per_gpu is not None and args.samples_per_s_per_gpu <= 0:
        raise config_lib.ConfigError(f"--samples-per-s-per-gpu must be > 0, got {args.samples_per_s_per_gpu}")
    if not 0 < args.mfu <= 1:
        raise config_lib.ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.reader_parallelism < 1:
        raise config_lib.ConfigError(f"--reader-parallelism must be at least 1, got {args.reader_parallelism}")
    if args.head not in (None, "none") and args.head not in table.instances:
        raise config_lib.ConfigError(f"--head {args.head!r} is not in the price table; allowed: none, "
                                     f"{', '.join(table.instances)}.")
    log = logging.getLogger("mmray")
    vocab, shards, shards_from = planner.data_facts(cfg)
    params, flops, itm = planner.model_facts(cfg, vocab)
    calibration = planner.calibrate(cfg, vocab, args.calibrate_steps) if args.calibrate else None
    inputs = planner.PlanInputs(params=params, vocab_size=vocab, itm=itm, flops_per_sample=flops,
                                samples_per_s_per_gpu=args.samples_per_s_per_gpu, measured_on=args.measured_on,
                                mfu=args.mfu, head=args.head,
                                cpu_samples_per_s=calibration["samples_per_s"] if calibration else None)
    shard_check = {**planner.check_shards(shards, cfg.train.num_workers, args.reader_parallelism),
                   "from": shards_from, "reader_parallelism": args.reader_parallelism}
    summary = planner.plan(cfg, table, inputs, shard_check)
    summary["calibration"] = calibration
    mem = summary["memory"]
    log.info("%s: %.1fM parameters, %.3g training FLOPs/sample; %d samples (%d steps x global batch %d)",
             cfg.model.preset, params / 1e6, flops, summary["samples"], cfg.train.max_steps, summary["global_batch"])
    log.info("memory per GPU (ZeRO-%d, %s, %d ranks): %.2f GiB = %.2f states + %.2f activations + %.2f overhead",
             mem["zero_stage"], mem["precision"], cfg.train.num_workers, mem["total_gib"], mem["model_states_gib"],
             mem["activations_gib"], mem["overhead_gib"])
    if shard_check["ok"] is False:
        log.warning("only %d training shards for %d workers x %d readers: readers will idle; write smaller shards",
                    shards, cfg.train.num_workers, args.reader_parallelism)
    else:
        log.info("shards: %s (need >= %d), %s", shards if shards is not None else "unknown", shard_check["needed"],
                 shards_from)
    print(planner.format_table(summary), file=sys.stderr)
    choice = summary["choice"]
    if choice:
        log.info("cheapest plan that fits: %d x %s (%s) - %.2f h, $%.2f", choice["nodes"], choice["instance_type"],
                 choice["market"], choice["hours"], choice["usd"])
    else:
        log.warning("no plan fits the memory%s: a smaller micro-batch, a higher ZeRO stage or more budget may help",
                    f" and the ${cfg.budget.usd:.2f} budget" if cfg.budget.usd else "")
    log.info("prices as of %s (%s); spot prices are a snapshot: override them (budget.prices)", table.as_of,
             table.path)
    return summary


def cmd_cost(args: argparse.Namespace) -> dict:
    from mmray import storage
    from mmray.cost import meter

    run_dir = args.run_dir if storage.is_s3(args.run_dir) else storage.resolve(args.run_dir)[1]
    summary = meter.report(run_dir)
    log = logging.getLogger("mmray")
    budget = f" of ${summary['budget_usd']:.2f}" if summary["budget_usd"] else " (no budget cap)"
    if summary["stopped"]:
        log.info("spent $%.4f%s; the run is stopped (it burned $%.3f/h over %s when it stopped)",
                 summary["spent_usd"], budget, summary["last_burn_usd_per_hour"], _nodes(summary["nodes_at_stop"]))
    else:
        log.info("spent $%.4f%s as of %.0f s ago; burn $%.3f/h over %s (%d seen)", summary["spent_usd"], budget,
                 summary["age_s"], summary["burn_usd_per_hour"], _nodes(summary["nodes_alive"], "live "),
                 summary["nodes_seen"])
    if summary["unpriced"]:
        log.warning("instance types missing from the price table (priced at its highest on-demand price): %s",
                    ", ".join(summary["unpriced"]))
    fc = summary["forecast"]
    if fc and fc["seconds"] is not None:
        log.info("to finish: %.2f h, $%.2f more, $%.2f in total%s", fc["seconds"] / 3600, fc["usd"], fc["total_usd"],
                 " - OVER BUDGET" if fc["over_budget"] else "")
    else:
        log.info("no throughput reported yet: no forecast")
    for rec in summary["preemptions"]:
        lost = rec.get("steps_lost")
        log.info("preemption of %s at step %s: %s s of notice, emergency checkpoint %s, %s",
                 ", ".join(rec.get("nodes") or []) or "?", rec.get("step"),
                 rec.get("notice_s") if rec.get("notice_s") is not None else "?",
                 {True: "before the deadline", False: "AFTER the deadline", None: "not confirmed"}[
                     rec.get("before_deadline")],
                 "not resumed yet" if "resumed_from_step" not in rec else
                 f"{lost} steps lost" if lost is not None else "steps lost unknown")
    if args.plot:
        summary["plot"] = meter.plot(run_dir, args.plot)
        log.info("wrote %s", summary["plot"])
    return summary


def register(sub: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `plan` and `cost` to the `mmray` subcommands (``sub``), as mmray/cli.py's build_parser does."""
    from mmray.cost.planner import DEFAULT_MFU, DEFAULT_READER_PARALLELISM, REFERENCE_GPU

    plan = sub.add_parser("plan", help="time, cost and memory of a config on every instance type; the cheapest plan "
                                       "that fits the budget", description=PLAN_HELP)
    with_config(plan)
    plan.add_argument("--samples-per-s-per-gpu", type=float, default=None, metavar="X",
                      help="measured training throughput of one GPU (on --measured-on); default: a FLOPs estimate")
    plan.add_argument("--measured-on", default=REFERENCE_GPU, metavar="GPU_TYPE",
                      help=f"GPU type the --samples-per-s-per-gpu figure was measured on (default {REFERENCE_GPU})")
    plan.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                      help=f"model-FLOPs utilisation assumed by the FLOPs estimate (default {DEFAULT_MFU})")
    plan.add_argument("--calibrate", action="store_true",
                      help="time a few forward/backward steps of the model on this CPU (adds a `local` plan)")
    plan.add_argument("--calibrate-steps", type=int, default=3, help="timed steps for --calibrate (default 3)")
    plan.add_argument("--reader-parallelism", type=int, default=DEFAULT_READER_PARALLELISM,
                      help=f"read tasks per worker the shard count must allow (default {DEFAULT_READER_PARALLELISM})")
    plan.add_argument("--head", default=None, metavar="INSTANCE_TYPE",
                      help="head instance type added to every plan's price ('none': no head); "
                           "default: the price table's head_instance_type")
    plan.set_defaults(fn=cmd_plan)

    cost = sub.add_parser("cost", help="spend, burn rate and forecast of a run; --plot writes a PNG",
                          description=COST_HELP)
    cost.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run.storage_path/<run name>), or s3://")
    cost.add_argument("--plot", metavar="PNG", default=None, help="write spend over time against the budget here")
    cost.set_defaults(fn=cmd_cost)


def _nodes(n: int, kind: str = "") -> str:
    return f"{n} {kind}node{'' if n == 1 else 's'}"
