"""Held-out evaluation of a model, the same in training (periodic and final) and in ``mmray eval``.

``evaluate(model, batches, tokenizer, cfg)`` consumes batches in the pipeline's schema (mmray.data.pipeline) and
returns a flat dict of metrics for whatever the model provides:

- retrieval R@1/5/10 in both directions, with chance levels (contrastive embeddings: late, attention);
- zero-shot classification accuracy from prompt templates (``eval.zero_shot_templates``) over the labels present
  in the data (the ``label`` column: a sample's metadata ``label``, or the shape of a one-object shapes scene);
- image-text matching accuracy on matched pairs and mined hard negatives (early, hierarchical, attention);
- caption token loss, and with ``eval.generate``: greedy captions scored by BLEU-4 and CIDEr-D;
- VQA exact-match accuracy of greedily generated answers, overall, per question type, and on the compositional
  types (``COMPOSITIONAL``: questions that bind an attribute to an object or relate two objects).

It runs on any ``nn.Module`` with MultimodalModel's interface, including a DeepSpeed engine's module: the forward
goes through ``forward_fn`` (the engine under ZeRO-3, so its parameter gathering applies), and the generative and
zero-shot parts run under ``gather`` (a context manager that makes the full parameters available; a no-op unless
ZeRO-3 partitions them).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable

import numpy as np
import torch

from mmray.config import zero_shot_templates
from mmray.eval import metrics as metric_fns
from mmray.eval.retrieval import retrieval_metrics
from mmray.losses import caption_loss

# Shapes question types that need cross-modal binding: which colour the named shape has, which shape has the named
# colour, whether one named object is left of another, and which colour the object named by its size has.
# ``count`` needs no binding.
COMPOSITIONAL = ("colour", "shape", "position", "size")


def _tensor(batch: dict, key: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(batch[key], copy=True)).to(device)  # Ray hands read-only arrays


def special_ids(tokenizer) -> tuple[int, int]:
    """(bos, eos) ids of a tokenizer: the first and last id it wraps the empty text in."""
    ids = tokenizer.encode_batch([""], 4)[0].tolist()
    ids = [i for i in ids if i != tokenizer.pad_id]
    if len(ids) < 2:
        raise ValueError("the tokenizer does not wrap texts in begin/end tokens, which generation needs")
    return ids[0], ids[-1]


def _decode_all(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row) for row in ids.cpu().numpy()]


def evaluate(model, batches: Iterable[dict[str, np.ndarray]], tokenizer, cfg, device: torch.device | None = None,
             forward_fn: Callable | None = None, gather: Callable[[], contextlib.AbstractContextManager] | None = None,
             max_samples: int | None = None) -> dict[str, float]:
    """Metrics over ``batches`` (at most ``max_samples`` rows, default ``cfg.eval.max_samples``; 0 means all)."""
    device = device or torch.device("cpu")
    forward = forward_fn or model
    gather = gather or contextlib.nullcontext
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    objectives = set(getattr(model, "objectives", ()))
    generate = cfg.eval.generate and getattr(model, "decoder", None) is not None
    bos, eos = special_ids(tokenizer) if generate else (0, 0)

    seen = 0
    images, texts, captions, labels = [], [], [], []
    itm_correct = itm_total = 0
    caption_sum, caption_batches = 0.0, 0
    generated_captions: list[str] = []
    vqa_pred: list[str] = []
    vqa_answer: list[str] = []
    vqa_type: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            n = len(batch["caption"])
            if limit and seen + n > limit:
                batch = {k: v[:limit - seen] for k, v in batch.items()}
                n = limit - seen
            if n == 0:
                break
            seen += n
            pixels, ids = _tensor(batch, "image", device), _tensor(batch, "text_ids", device)
            has_qa = "question_ids" in batch and "vqa" in objectives
            out = (forward(pixels, ids, _tensor(batch, "question_ids", device), _tensor(batch, "answer_ids", device))
                   if has_qa else forward(pixels, ids))
            captions.extend(str(c) for c in batch["caption"])
            labels.extend(str(x) for x in batch.get("label", [""] * n))
            if "image_embeds" in out:
                images.append(out["image_embeds"].float().cpu())
                texts.append(out["text_embeds"].float().cpu())
            if "itm_logits" in out:
                itm_correct += int((out["itm_logits"].argmax(-1) == out["itm_labels"]).sum())
                itm_total += len(out["itm_labels"])
            if "caption_logits" in out:
                caption_sum += float(caption_loss(out["caption_logits"], out["caption_targets"]))
                caption_batches += 1
            if generate and "caption" in objectives:
                with gather():
                    ids_out = model.generate(pixels, bos, eos, max_new_tokens=cfg.eval.max_new_tokens)
                generated_captions.extend(_decode_all(tokenizer, ids_out))
            if generate and "vqa" in objectives and "question" in batch:
                rows = [i for i, q in enumerate(batch["question"]) if q]
                if rows:
                    index = torch.tensor(rows, device=device)
                    with gather():
                        ids_out = model.generate(pixels[index], bos, eos, max_new_tokens=cfg.eval.max_new_tokens,
                                                 prompt_ids=_tensor(batch, "question_ids", device)[index])
                    vqa_pred.extend(_decode_all(tokenizer, ids_out))
                    vqa_answer.extend(str(batch["answer"][i]) for i in rows)
                    vqa_type.extend(str(batch["qa_type"][i]) for i in rows)
    model.train(was_training)
    if not captions:
        raise ValueError("the evaluation data is empty; nothing to evaluate")

    metrics: dict[str, float] = {"eval_pairs": len(captions)}
    if images:
        image_embeds, text_embeds = torch.cat(images), torch.cat(texts)
        metrics.update(retrieval_metrics(image_embeds, text_embeds, captions, ks=(1, 5, 10)))
        metrics.update(_zero_shot(model, image_embeds, labels, tokenizer, cfg, device, gather))
    if itm_total:
        metrics["itm_acc"] = itm_correct / itm_total
    if caption_batches:
        metrics["caption_loss"] = caption_sum / caption_batches
    if generated_captions:
        references = [[c] for c in captions]
        metrics["bleu4"] = metric_fns.bleu4(generated_captions, references)
        metrics["cider_d"] = metric_fns.cider_d(generated_captions, references)
        metrics["caption_exact"] = float(np.mean([g.strip() == c.strip().lower()
                                                  for g, c in zip(generated_captions, captions)]))
    if vqa_pred:
        metrics.update(vqa_metrics(vqa_pred, vqa_answer, vqa_type))
    return metrics


def vqa_metrics(predictions: list[str], answers: list[str], types: list[str]) -> dict[str, float]:
    """Exact-match accuracy overall, per question type (``vqa_acc_<type>``) and on COMPOSITIONAL types."""
    out = {"vqa_acc": metric_fns.vqa_accuracy(predictions, answers), "vqa_questions": len(predictions)}
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, kind in enumerate(types):
        by_type[kind or "other"].append(i)
    for kind, rows in sorted(by_type.items()):
        out[f"vqa_acc_{kind}"] = metric_fns.vqa_accuracy([predictions[i] for i in rows], [answers[i] for i in rows])
    compositional = [i for i, kind in enumerate(types) if kind in COMPOSITIONAL]
    if compositional:
        out["vqa_acc_compositional"] = metric_fns.vqa_accuracy([predictions[i] for i in compositional],
                                                               [answers[i] for i in compositional])
    return out


def _zero_shot(model, image_embeds: torch.Tensor, labels: list[str], tokenizer, cfg, device,
               gather) -> dict[str, float]:
    """Zero-shot accuracy over the labelled images; {} when fewer than two classes are present."""
    classes = sorted({x for x in labels if x})
    if len(classes) < 2 or not hasattr(model, "fusion") or not hasattr(model.fusion, "text_proj"):
        return {}
    templates = zero_shot_templates(cfg.eval.zero_shot_templates)
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    ids = torch.from_numpy(tokenizer.encode_batch(prompts, cfg.data.max_text_len)).to(device)
    with torch.no_grad(), gather():
        text = model.fusion.contrast_text(model.fusion.encode_text(ids)).float().cpu()
    rows = [i for i, x in enumerate(labels) if x]
    index = {c: k for k, c in enumerate(classes)}
    return metric_fns.zero_shot_accuracy(image_embeds[rows], text.reshape(len(classes), len(templates), -1),
                                         [index[labels[i]] for i in rows])
