"""Image-text retrieval metrics with exact chance levels.

A hit is a retrieved item whose caption text equals the query's ground-truth caption, so duplicate captions in the
held-out set (common in small synthetic sets) count as correct, and the chance level accounts for them.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch


def _recall(sim: torch.Tensor, query_captions: Sequence[str], item_captions: Sequence[str], k: int) -> float:
    """Fraction of queries (rows of ``sim``) with a matching caption among their top-k items (columns)."""
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices                   # (N, k)
    hits = sum(any(item_captions[j] == query_captions[i] for j in row) for i, row in enumerate(topk.tolist()))
    return hits / sim.shape[0]


def chance_recall(captions: Sequence[str], k: int) -> float:
    """Expected recall@k of a uniformly random ranking: 1 - C(N-m, k) / C(N, k) for a query with m matches."""
    n = len(captions)
    counts = Counter(captions)
    k = min(k, n)
    return sum(1 - math.comb(n - counts[c], k) / math.comb(n, k) for c in captions) / n


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str],
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k over N paired, L2-normalised embeddings (N, E), with chance levels."""
    sim = image_embeds.float() @ text_embeds.float().T                     # (N images, N texts)
    out: dict[str, float] = {"eval_pairs": len(captions)}
    for k in ks:
        out[f"i2t_r@{k}"] = _recall(sim, captions, captions, k)
        out[f"t2i_r@{k}"] = _recall(sim.T, captions, captions, k)
        out[f"chance_r@{k}"] = chance_recall(captions, k)
    return out
