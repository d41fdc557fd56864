"""The `mmray sweep` subcommand: parsing and printing only (mmray/cli.py calls :func:`register`).

Like every mmray command it logs for humans on stderr (the results table included) and returns the JSON summary
that the CLI prints as the last stdout line; a bad sweep config raises ConfigError before Ray starts: exit code 2.
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable

SWEEP_HELP = """\
Search fusion strategies and hyperparameters with Ray Tune under one budget. The config is a training config plus a
`sweep:` section (search space over the dotted config keys, search: random | grid | optuna, scheduler: asha | pbt |
fifo, metric and mode, num_samples, max_concurrent, budget in USD and/or GPU-hours); see
jobs/configs/sweep-fusion.yaml. Each trial is a whole `mmray train` run (Ray Train V2 inside a Tune trial) in
SWEEP_DIR/runs/<trial id>. No trial starts unless its projected cost fits what is left of the budget, and running
trials are stopped before the spend can cross it. Writes results.csv, best_config.yaml (accepted by `mmray train
--config`), metric_vs_cost.png (Pareto frontier), best_per_fusion.png and learning_curves.png into SWEEP_DIR
(sweep.storage_path/sweep.name). Overrides: section.key=value for the training config, sweep.key=value or
sweep.section.key=value for the sweep (e.g. sweep.num_samples=4 sweep.budget.usd=5). A trial that fails is
recorded with its error and the sweep goes on; when every trial failed, the summary is printed and the exit code is 1.
"""


def cmd_sweep(args: argparse.Namespace) -> dict:
    from mmray.config import ConfigError
    from mmray.sweep import spec as spec_lib

    if not args.config:
        raise ConfigError("mmray sweep needs --config: a training config with a sweep: section "
                          "(see jobs/configs/sweep-fusion.yaml).")
    spec = spec_lib.load(args.config, args.overrides)  # validated before Ray starts
    from mmray.sweep.runner import run_sweep

    logging.getLogger("mmray").info("sweep %s -> %s%s", spec.name, spec.sweep_dir, " (resuming)" if args.resume else "")
    summary = run_sweep(spec, resume=args.resume)
    if summary["trials"] and summary["errored"] == summary["trials"]:
        from mmray.cli import CommandFailed

        raise CommandFailed(f"every trial of the sweep failed ({summary['trials']}); their errors are in "
                            f"{summary['outputs'].get('results_csv', spec.sweep_dir)} (column error)", summary)
    return summary


def register(sub: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `sweep` to the `mmray` subcommands (``sub``), as mmray/cli.py's build_parser does."""
    sweep = sub.add_parser("sweep", help="search fusion strategies and hyperparameters under a budget (Ray Tune)",
                           description=SWEEP_HELP)
    with_config(sweep)
    sweep.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep of this config (Tuner.restore); finished trials are kept")
    sweep.set_defaults(fn=cmd_sweep)
