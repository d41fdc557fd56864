"""What a sweep leaves behind: the results table (CSV and printed), the best config, and the plots.

Everything here works on plain rows (one dict per trial, see :func:`rows`) so that it is testable without Ray:
:func:`pareto_front` finds the trials no other trial beats on both cost and metric, and the plots are drawn with
matplotlib's Agg backend (no display) and written through :mod:`mmray.storage` (local or s3://).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable

from mmray import storage
from mmray.sweep.spec import SweepSpec

RESULTS_CSV = "results.csv"
BEST_CONFIG = "best_config.yaml"
PLOTS = {"metric_vs_cost": "metric_vs_cost.png", "best_per_fusion": "best_per_fusion.png",
         "learning_curves": "learning_curves.png"}
FUSION_KEY = "model.fusion"


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def pareto_front(points: list[tuple[float | None, float | None]], mode: str) -> list[int]:
    """Indices of the points that no other point dominates (cost no higher and metric no worse, one of them
    strictly), sorted by cost. Points without a cost or a metric are left out."""
    sign = 1.0 if mode == "max" else -1.0
    valid = [(i, c, sign * m) for i, (c, m) in enumerate(points) if c is not None and m is not None]
    front = []
    for i, c, m in valid:
        dominated = any((c2 <= c and m2 >= m) and (c2 < c or m2 > m) for j, c2, m2 in valid if j != i)
        if not dominated:
            front.append((c, -m, i))
    return [i for _, _, i in sorted(front)]


def rows(results: Iterable[dict], spec: SweepSpec) -> list[dict]:
    """Table rows, best first: one per trial, from ``results`` (dicts with trial_id, config, metrics, error, and
    the ledger's wall_s, cost_usd, gpu_hours, stopped_for_budget, done)."""
    out = []
    max_steps = spec.config.train.max_steps
    for r in results:
        metrics = r.get("metrics") or {}
        steps = int(metrics.get("step", 0) or 0)
        error = r.get("error") or ""
        done = r.get("done", True)  # a trial of an interrupted sweep that --resume will continue is not done
        stopped = done and not error and steps < max_steps
        row = {"trial_id": r["trial_id"], "status": "ERROR" if error else "TERMINATED" if done else "INTERRUPTED"}
        for key in spec.keys:
            row[key] = (r.get("config") or {}).get(key, "")
        row.update({
            spec.metric: _number(metrics.get(spec.metric)),
            "steps": steps,
            "wall_s": round(float(r.get("wall_s", 0.0)), 2),
            "cost_usd": round(float(r.get("cost_usd", 0.0)), 6),
            "gpu_hours": round(float(r.get("gpu_hours", 0.0)), 6),
            "stopped_early": stopped,
            "stopped_by": ("budget" if r.get("stopped_for_budget") else spec.scheduler.name) if stopped else "",
            "error": " ".join(str(error).split())[:500],
            "run_dir": metrics.get("run_dir", "") or r.get("run_dir", ""),
        })
        out.append(row)
    sign = -1.0 if spec.mode == "max" else 1.0
    return sorted(out, key=lambda x: (x[spec.metric] is None, sign * (x[spec.metric] or 0.0), x["trial_id"]))


def best(table: list[dict], spec: SweepSpec) -> dict | None:
    """The best trial with the metric; rows() sorts best first."""
    return next((r for r in table if r[spec.metric] is not None and r["status"] != "ERROR"), None)


def write_csv(table: list[dict], path: str) -> str:
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    storage.write_text(path, buf.getvalue())
    return path


def format_table(table: list[dict], spec: SweepSpec) -> str:
    """The results for humans (stderr): one line per trial, best first."""
    keys = spec.keys
    head = ["trial", *keys, spec.metric, "steps", "wall_s", "cost_usd", "stopped", "error"]
    lines = [head]
    for r in table:
        value = r[spec.metric]
        lines.append([r["trial_id"], *(_short(r[k]) for k in keys), "-" if value is None else f"{value:.4f}",
                      str(r["steps"]), f"{r['wall_s']:.1f}", f"{r['cost_usd']:.4f}",
                      r["stopped_by"] or "-", (r["error"][:60] + "...") if len(r["error"]) > 60 else r["error"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def fusion_of(row: dict, spec: SweepSpec) -> str:
    return str(row.get(FUSION_KEY) or spec.config.model.fusion)


# ------------------------------------------------------------------------------------------------------------ plots

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    plt = _figure()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
    return path


def plot_metric_vs_cost(table: list[dict], spec: SweepSpec, path: str) -> str:
    """Every trial's metric against its cost; the Pareto frontier (best metric for the money) highlighted."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    done = [r for r in table if r[spec.metric] is not None]
    fusions = sorted({fusion_of(r, spec) for r in done})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(fusions)}
    for f in fusions:
        pts = [r for r in done if fusion_of(r, spec) == f]
        ax.scatter([r["cost_usd"] for r in pts], [r[spec.metric] for r in pts], color=colours[f], label=f, s=36,
                   marker="o", edgecolors="none", alpha=0.85)
        early = [r for r in pts if r["stopped_early"]]
        ax.scatter([r["cost_usd"] for r in early], [r[spec.metric] for r in early], facecolors="none",
                   edgecolors="grey", s=90, linewidths=0.8)
    front = [done[i] for i in pareto_front([(r["cost_usd"], r[spec.metric]) for r in done], spec.mode)]
    if front:
        ax.step([r["cost_usd"] for r in front], [r[spec.metric] for r in front], where="post", color="crimson",
                linewidth=1.6, label="Pareto frontier", zorder=3)
        ax.scatter([r["cost_usd"] for r in front], [r[spec.metric] for r in front], s=110, facecolors="none",
                   edgecolors="crimson", linewidths=1.6, zorder=4)
    ax.set_xlabel("trial cost (USD)")
    ax.set_ylabel(spec.metric + (" (higher is better)" if spec.mode == "max" else " (lower is better)"))
    ax.set_title(f"{spec.name}: quality per dollar (grey rings: stopped early)", fontsize=9)
    if done:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_best_per_fusion(table: list[dict], spec: SweepSpec, path: str) -> str:
    """The best metric reached by each fusion strategy."""
    plt = _figure()
    best_by: dict[str, float] = {}
    for r in table:
        value = r[spec.metric]
        if value is None:
            continue
        f = fusion_of(r, spec)
        if f not in best_by or better(value, best_by[f], spec.mode):
            best_by[f] = value
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    names = sorted(best_by, key=lambda f: best_by[f], reverse=spec.mode == "max")
    ax.bar(names, [best_by[f] for f in names], color=[plt.get_cmap("tab10")(i % 10) for i in range(len(names))])
    for i, f in enumerate(names):
        ax.text(i, best_by[f], f"{best_by[f]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"best {spec.metric}")
    ax.set_title("best trial per fusion strategy", fontsize=9)
    return _save(fig, path)


def plot_learning_curves(curves: dict[str, list[tuple[float, float]]], table: list[dict], spec: SweepSpec,
                         path: str) -> str:
    """The metric against optimizer steps for every trial (dashed: stopped early)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_id = {r["trial_id"]: r for r in table}
    fusions = sorted({fusion_of(r, spec) for r in table})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(fusions)}
    labelled = set()
    for trial_id, points in sorted(curves.items()):
        row = by_id.get(trial_id)
        if not row or not points:
            continue
        f = fusion_of(row, spec)
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, color=colours[f], linestyle="--" if row["stopped_early"] else "-", marker=".",
                label=f if f not in labelled else None, alpha=0.85)
        labelled.add(f)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(spec.metric)
    ax.set_title("learning curves (dashed: stopped early)", fontsize=9)
    if labelled:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def write_outputs(table: list[dict], curves: dict, spec: SweepSpec, sweep_dir: str) -> dict[str, str]:
    """The CSV, the best config (when a trial has the metric) and the three plots; returns their paths."""
    paths = {"results_csv": write_csv(table, storage.join(sweep_dir, RESULTS_CSV))}
    top = best(table, spec)
    if top is not None:
        params = {k: top[k] for k in spec.keys if top[k] != ""}
        header = (f"# The best trial of sweep {spec.name}: {top['trial_id']}, {spec.metric} = {top[spec.metric]:.4f} "
                  f"({spec.mode}), ${top['cost_usd']:.4f}.\n# Train it with: mmray train --config {BEST_CONFIG}\n")
        paths["best_config"] = storage.join(sweep_dir, BEST_CONFIG)
        storage.write_text(paths["best_config"], spec.best_config_yaml(params, header))
    paths["metric_vs_cost_png"] = plot_metric_vs_cost(table, spec, storage.join(sweep_dir, PLOTS["metric_vs_cost"]))
    paths["best_per_fusion_png"] = plot_best_per_fusion(table, spec,
                                                        storage.join(sweep_dir, PLOTS["best_per_fusion"]))
    paths["learning_curves_png"] = plot_learning_curves(curves, table, spec,
                                                        storage.join(sweep_dir, PLOTS["learning_curves"]))
    return paths
