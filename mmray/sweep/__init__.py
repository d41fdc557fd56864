"""Sweeps: Ray Tune searches fusion strategies and hyperparameters under one budget (`mmray sweep`).

A sweep config is a training config (the sections of :mod:`mmray.config`) plus a top-level ``sweep:`` section that
this package parses (:mod:`mmray.sweep.spec`): the search space over the same dotted keys as the CLI overrides, the
search algorithm, the scheduler, the metric, the concurrency and the budget. Each Tune trial is a whole mmray
training (:func:`mmray.train.trainer.train`, a Ray Train V2 run launched from inside the trial) with its own run
directory, checkpoints and data pipeline (:mod:`mmray.sweep.trial`). :mod:`mmray.sweep.budget` projects every
trial's cost before it starts and stops the sweep before it spends more than its budget; :mod:`mmray.sweep.report`
writes the results table, the best config and the plots; :mod:`mmray.sweep.runner` ties them together.

Modules import neither Ray nor torch at module level, except :mod:`mmray.sweep.trial` and :mod:`mmray.sweep.runner`.
"""
