"""What a sweep costs on top of its trainings, and whether it ranks the fusion strategies as it should.

Runs a sweep at concurrency 1 with no early stopping (FIFO), one trial per fusion strategy, through the real
`mmray sweep` path (Ray Tune driving Ray Train V2 + DeepSpeed trials), then compares side by side:

- ``ratio_vs_trial_training``: the sweep's wall time / the sum of its trials' training times (each trial's
  ``mmray.train.trainer.train`` call, start-up of its Ray Train run included). Goal: <= 1.10 at concurrency 1.
- with ``--baseline``: the same trainings run one after another without Tune (``train(cfg)`` on the same configs),
  and ``ratio_vs_standalone``: the sweep's wall time / the sum of those.
- ``first_step_s``: per trial, the seconds from the trial's start to the end of its first optimizer step
  (train.log_every=1 makes the first report the first step; the trials report every step, so the overhead figures
  include one report per step, which only makes them pessimistic).
- with ``--fusion-check``: the held-out VQA accuracy on the compositional question types for each strategy, and
  whether the best cross-modal strategy (early, hierarchical, attention) beats late fusion, on the packaged mix of
  question types. That needs thousands of steps (see --steps); tests/integration/test_sweep_ranking.py shows the
  ranking in 300 steps on the colour-of-size questions alone.

Prints one JSON object.

    python bench/sweep_overhead.py --steps 30 --baseline
    python bench/sweep_overhead.py --fusion-check --steps 400 --samples 8000 --fusions late,hierarchical,attention \
        --instance-type m6i.xlarge --out /path/to/keep
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

FUSIONS = ("late", "early", "hierarchical", "attention")


def sweep_config(args, root: str, data_dir: str) -> dict:
    steps = args.steps
    check = args.fusion_check
    every = max(1, steps // 3)
    return {
        "data": {"source": "synthetic:shapes", "synthetic_samples": args.samples, "synthetic_val_samples": 256,
                 "cache_dir": data_dir, "image_size": 32, "max_text_len": 24, "shuffle_buffer": 512},
        "model": {"patch_size": 4 if check else 8, "image_depth": 2 if check else 1, "text_depth": 1,
                  "decoder_depth": 1, "vqa_weight": 1, "caption_weight": 0, "contrastive_weight": 0,
                  "itm_weight": 0},
        "train": {"num_workers": args.workers, "cpus_per_worker": 1,
                  "micro_batch_size": 64 if check else 32, "max_steps": steps, "lr": 1e-3,
                  "warmup_steps": max(1, steps // 20), "checkpoint_every": steps, "log_every": 1 if not check else
                  max(1, steps // 10)},
        "eval": {"every": every, "max_samples": 256 if check else 64, "max_new_tokens": 4,
                 "generate": True},
        "run": {"storage_path": os.path.join(root, "standalone")},
        "sweep": {"name": "bench", "storage_path": os.path.join(root, "sweeps"),
                  "metric": "val_vqa_acc_compositional" if check else "val_vqa_acc", "mode": "max",
                  "search": "grid", "max_concurrent": 1, "scheduler": {"name": "fifo"},
                  "space": {"model.fusion": {"grid": fusions(args)}},
                  "budget": {"instance_type": args.instance_type}},
    }


def fusions(args) -> list[str]:
    chosen = args.fusions.split(",") if args.fusions else list(FUSIONS[:args.trials])
    unknown = set(chosen) - set(FUSIONS)
    if unknown:
        raise SystemExit(f"--fusions: unknown {sorted(unknown)}; choose from {', '.join(FUSIONS)}")
    return chosen


def trial_results(sweep_dir: str) -> dict[str, list[dict]]:
    """Every Tune result of every trial, from the experiment's result.json files."""
    out = {}
    tune_dir = os.path.join(sweep_dir, "tune")
    for name in sorted(os.listdir(tune_dir)):
        path = os.path.join(tune_dir, name, "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                out[name] = [json.loads(line) for line in f if line.strip()]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per trial")
    p.add_argument("--trials", type=int, default=4, choices=(1, 2, 3, 4), help="fusion strategies (one trial each)")
    p.add_argument("--fusions", default="", help="comma-separated strategies instead of the first --trials")
    p.add_argument("--instance-type", default="local",
                   help="price-table entry the trials are priced at (their share of it), for the cost axis")
    p.add_argument("--samples", type=int, default=2000, help="generated shapes samples (train + 256 val)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--baseline", action="store_true", help="also run the same trainings without Tune")
    p.add_argument("--fusion-check", action="store_true",
                   help="VQA-only trainings long enough to compare the strategies on compositional questions")
    p.add_argument("--out", default=None, help="where the sweep and the runs go (default: a temporary directory)")
    args = p.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from mmray.sweep import spec as spec_lib
    from mmray.sweep.runner import run_sweep
    from mmray.train.trainer import resolve_data, train

    root = args.out or tempfile.mkdtemp(prefix="mmray-sweep-bench-")
    spec = spec_lib.from_mapping(sweep_config(args, root, os.path.join(root, "data")))
    resolve_data(spec.config)  # data generation is not part of either side
    # as `mmray train` sizes a local Ray: every worker's CPU plus room for the data pipeline
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.workers + 2), include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        summary = run_sweep(spec)
        sweep_s = time.perf_counter() - t0
        results = trial_results(spec.sweep_dir)
        trials = []
        for trial_id, rows in results.items():
            final = rows[-1]
            trials.append({"trial_id": trial_id, "fusion": final["config"]["model.fusion"],
                           "train_wall_s": final.get("train_wall_s"), "trial_wall_s": final.get("trial_wall_s"),
                           "first_step_s": final.get("first_report_wall_s") if final.get("first_report_step") == 1
                           else None, "steps": final.get("step"), "train_s": final.get("train_s"),
                           spec.metric: final.get(spec.metric),
                           **{k: final[k] for k in final if k.startswith("val_vqa_acc")}})
        train_sum = sum(t["train_wall_s"] or 0.0 for t in trials)
        out = {
            "bench": "sweep_overhead", "trials": len(trials), "steps": args.steps, "workers": args.workers,
            "concurrency": 1, "sweep_wall_s": round(sweep_s, 2), "sum_trial_train_wall_s": round(train_sum, 2),
            "ratio_vs_trial_training": round(sweep_s / train_sum, 3) if train_sum else None,
            "goal_ratio": 1.10,
            "first_step_s": [t["first_step_s"] for t in trials],
            "mean_first_step_s": round(sum(t["first_step_s"] or 0 for t in trials) / max(1, len(trials)), 2),
            "errored": summary["errored"],
        }
        if args.baseline:
            standalone = []
            for t in trials:
                cfg = spec.trial_config({"model.fusion": t["fusion"], "run.name": f"standalone-{t['fusion']}"})
                t1 = time.perf_counter()
                train(cfg)
                standalone.append(time.perf_counter() - t1)
            out["sum_standalone_train_s"] = round(sum(standalone), 2)
            out["ratio_vs_standalone"] = round(sweep_s / sum(standalone), 3)
        if args.fusion_check:
            by_fusion = {t["fusion"]: t.get("val_vqa_acc_compositional") for t in trials}
            cross = {f: v for f, v in by_fusion.items() if f != "late" and v is not None}
            out["compositional_acc"] = by_fusion
            out["best_cross_modal"] = max(cross, key=cross.get) if cross else None
            out["cross_modal_beats_late"] = bool(cross and by_fusion.get("late") is not None
                                                 and max(cross.values()) > by_fusion["late"])
        out["trial_details"] = trials
        out["sweep_dir"] = spec.sweep_dir
    finally:
        ray.shutdown()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
