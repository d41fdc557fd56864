"""Retrieval metrics and their chance levels."""
import math

import pytest
import torch

from mmray.eval.retrieval import chance_recall, retrieval_metrics


def test_perfect_and_reversed_retrieval():
    e = torch.eye(4)
    caps = ["a", "b", "c", "d"]
    m = retrieval_metrics(e, e, caps, ks=(1,))
    assert m["i2t_r@1"] == 1.0 and m["t2i_r@1"] == 1.0
    m = retrieval_metrics(e, e.flip(0), caps, ks=(1,))
    assert m["i2t_r@1"] == 0.0


def test_duplicate_captions_count_as_hits():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 0 and 1 swapped
    assert retrieval_metrics(images, texts, ["x", "y", "z"], ks=(1,))["i2t_r@1"] == pytest.approx(1 / 3)
    assert retrieval_metrics(images, texts, ["x", "x", "z"], ks=(1,))["i2t_r@1"] == 1.0


def test_chance_levels():
    assert chance_recall(list("abcd"), 1) == pytest.approx(0.25)
    assert chance_recall(list("abcdefghij"), 5) == pytest.approx(0.5)
    # two equal captions among four: a query matches 2 of 4 items
    assert chance_recall(["a", "a", "b", "c"], 1) == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert chance_recall(["a"] * 3, 1) == 1.0


def test_random_embeddings_score_near_chance():
    torch.manual_seed(0)
    n = 400
    caps = [str(i) for i in range(n)]
    m = retrieval_metrics(torch.nn.functional.normalize(torch.randn(n, 32), dim=-1),
                          torch.nn.functional.normalize(torch.randn(n, 32), dim=-1), caps)
    assert m["chance_r@5"] == pytest.approx(5 / n)
    assert m["i2t_r@5"] < 5 * m["chance_r@5"] + 3 * math.sqrt(5 / n / n)
