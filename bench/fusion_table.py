"""Fusion strategies side by side: each of the four trains on the same shapes VQA + caption data, with the same
objectives (VQA and captioning through the decoder), for the same number
of steps through the real trainer (Ray Train + DeepSpeed), and is evaluated on the same held-out questions.

Prints one JSON object (a row per strategy: VQA accuracy overall / per question type / on the compositional types,
caption BLEU-4 and CIDEr-D, parameters, seconds per step) and writes a Markdown table and a PNG bar chart.

    python bench/fusion_table.py --steps 600 --out bench/results

The compositional types (mmray.eval.evaluate.COMPOSITIONAL) need the question bound to the image: "what colour is
the square?", "what shape is the red object?", "is the red circle left of the blue square?". ``count`` does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

FUSIONS = ("late", "early", "hierarchical", "attention")
TYPES = ("count", "colour", "shape", "position")


def overrides(fusion: str, steps: int, samples: int, workers: int, storage: str, data_dir: str,
              seed: int = 0) -> list[str]:
    return [
        # The same objectives for every strategy: VQA and captioning through the decoder (contrastive and ITM,
        # which only some strategies provide, are off).
        f"model.fusion={fusion}", "model.decoder_depth=1", "model.vqa_weight=1", "model.caption_weight=1",
        "model.contrastive_weight=0", "model.itm_weight=0",
        "model.patch_size=4", "model.image_depth=2", "model.text_depth=1",
        "data.image_size=32", "data.max_text_len=24", f"data.synthetic_samples={samples}",
        "data.synthetic_val_samples=512", f"data.cache_dir={data_dir}", "data.shuffle_buffer=1024",
        f"train.num_workers={workers}", f"train.cpus_per_worker={max(1, (os.cpu_count() or 2) // workers)}",
        "train.micro_batch_size=64", f"train.max_steps={steps}", "train.lr=1e-3",
        f"train.warmup_steps={max(1, steps // 20)}", f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 6)}", "eval.max_samples=512", "eval.max_new_tokens=4",
        f"run.storage_path={storage}", f"run.name=fusion-{fusion}", f"train.seed={seed}",
    ]


def markdown(rows: list[dict], steps: int) -> str:
    head = ("| strategy | VQA acc | compositional | " + " | ".join(TYPES) +
            " | caption BLEU-4 | CIDEr-D | params (M) | s/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["metrics"]
        cells = [r["fusion"], f"{m.get('val_vqa_acc', float('nan')):.3f}",
                 f"**{m.get('val_vqa_acc_compositional', float('nan')):.3f}**",
                 *(f"{m.get(f'val_vqa_acc_{t}', float('nan')):.3f}" for t in TYPES),
                 f"{m.get('val_bleu4', float('nan')):.3f}", f"{m.get('val_cider_d', float('nan')):.2f}",
                 f"{r['parameters'] / 1e6:.2f}", f"{r['s_per_step']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{steps} steps each; VQA on 512 held-out questions (one per image).\n"


def bar_chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["compositional", *TYPES]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["metrics"].get(f"val_vqa_acc_{g}", 0.0) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=r["fusion"])
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("held-out VQA accuracy")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(rows), fontsize=8, loc="upper right")
    ax.set_title("Fusion strategies on shapes VQA (same data, same steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--samples", type=int, default=8000, help="generated samples (train + 512 val)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="train.seed: initialisation and data order (the data set is "
                   "the same for every seed)")
    p.add_argument("--fusions", default=",".join(FUSIONS))
    p.add_argument("--out", default="bench/results", help="directory for fusion_table.md / .png / .json")
    p.add_argument("--data-dir", default="~/.cache/mmray/bench-data")
    p.add_argument("--reuse", action="store_true",
                   help="keep the rows already in OUT (row-FUSION.json, same --steps/--samples) instead of rerunning "
                        "them; each strategy's row is saved as soon as it finishes")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from mmray import config
    from mmray.export import build_model
    from mmray.train.trainer import resolve_data, train

    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmray-fusion-table-") as storage:
        for fusion in args.fusions.split(","):
            row_path = os.path.join(args.out, f"row-{fusion}.json")
            if args.reuse and os.path.exists(row_path):
                with open(row_path) as f:
                    row = json.load(f)
                if (row["steps"], row.get("samples"), row.get("seed", 0)) == (args.steps, args.samples, args.seed):
                    rows.append(row)
                    print(f"{fusion}: reusing {row_path}", file=sys.stderr, flush=True)
                    continue
            cfg = config.load(None, overrides(fusion, args.steps, args.samples, args.workers, storage,
                                              args.data_dir, args.seed))
            t0 = time.perf_counter()
            summary = train(cfg)
            tokenizer = resolve_data(cfg).tokenizer
            parameters = sum(t.numel() for t in build_model(cfg, tokenizer).parameters())
            m = summary["metrics"]
            row = {"fusion": fusion, "steps": summary["steps"], "samples": args.samples, "seed": args.seed,
                   "parameters": parameters,
                   "s_per_step": m.get("train_s", time.perf_counter() - t0) / max(1, summary["steps"]),
                   "wall_s": round(time.perf_counter() - t0, 1),
                   "metrics": {k: v for k, v in m.items() if k.startswith("val_")}}
            rows.append(row)
            with open(row_path, "w") as f:
                json.dump(row, f, indent=1)
            print(json.dumps({"fusion": fusion, "vqa_acc_compositional": m.get("val_vqa_acc_compositional"),
                              "wall_s": row["wall_s"]}), file=sys.stderr, flush=True)
    table = markdown(rows, args.steps)
    with open(os.path.join(args.out, "fusion_table.md"), "w") as f:
        f.write(table)
    bar_chart(rows, os.path.join(args.out, "fusion_table.png"))
    late = next((r for r in rows if r["fusion"] == "late"), None)
    best = max(rows, key=lambda r: r["metrics"].get("val_vqa_acc_compositional", 0.0))
    result = {"steps": args.steps, "rows": rows, "table": os.path.join(args.out, "fusion_table.md"),
              "chart": os.path.join(args.out, "fusion_table.png"), "best_compositional": best["fusion"],
              "best_minus_late": (best["metrics"].get("val_vqa_acc_compositional", 0.0)
                                  - late["metrics"].get("val_vqa_acc_compositional", 0.0)) if late else None}
    with open(os.path.join(args.out, "fusion_table.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table, file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
