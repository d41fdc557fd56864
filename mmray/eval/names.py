"""The names of the held-out metrics :func:`mmray.eval.evaluate.evaluate` reports (without the ``val_`` prefix the
training loop gives them), for checking a metric a config names before anything runs: ``sweep.metric`` and
``run.keep_best_metric``. No heavy imports: the command line checks configs before it imports torch."""
from __future__ import annotations

import difflib

RECALL_KS = (1, 5, 10)
METRICS = (
    "eval_pairs",
    *(f"{d}_r@{k}" for d in ("i2t", "t2i", "chance") for k in RECALL_KS),  # retrieval (contrastive objective)
    "zero_shot_acc", "zero_shot_chance", "zero_shot_classes",             # zero-shot classification (labels)
    "itm_acc",                                                             # image-text matching
    "caption_loss", "bleu4", "cider_d", "caption_exact",                   # captioning
    "vqa_acc", "vqa_questions", "vqa_acc_compositional",                   # VQA; also vqa_acc_<question type>
)
VQA_TYPE_PREFIX = "vqa_acc_"  # one accuracy per question type of the data (`type` of its QA pairs)


def known(name: str) -> bool:
    """Whether the evaluation can report ``name`` (without ``val_``): a fixed metric, or ``vqa_acc_<type>`` for any
    question type the data may hold."""
    return name in METRICS or (name.startswith(VQA_TYPE_PREFIX) and len(name) > len(VQA_TYPE_PREFIX))


def unknown_message(key: str, metric: str) -> str:
    """The error for a ``val_`` metric the evaluation never reports, with the nearest name."""
    names = [f"val_{m}" for m in METRICS]
    near = difflib.get_close_matches(metric.lower(), names, n=1, cutoff=0.5)
    return (f"{key}: {metric!r} is not a held-out metric the evaluation reports"
            + (f". Did you mean {near[0]!r}?" if near else "")
            + f" Held-out metrics: {', '.join(names)}, and val_vqa_acc_<question type>.")
