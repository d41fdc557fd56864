"""The ZeRO memory formulas and byte counting of bench/zero_memory.py, on hand-computed numbers."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "zero_memory", Path(__file__).resolve().parents[2] / "bench" / "zero_memory.py")
zero_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zero_memory)

GB = 1e9


def test_mixed_precision_formulas_reproduce_the_zero_papers_figure_1():
    # Rajbhandari et al. 2020, fig. 1: a 7.5B-parameter model, 64 ranks, K = 12:
    # 120 GB, 31.4 GB, 16.6 GB and 1.9 GB per rank for the baseline, P_os, P_os+g and P_os+g+p.
    totals = [zero_memory.formula_bytes(s, int(7.5e9), 64, 2, 2, 12)["total"] / GB for s in range(4)]
    assert totals == pytest.approx([120.0, 31.40625, 16.640625, 1.875])


def test_fp32_formulas_partition_optimizer_then_gradients_then_parameters():
    # Psi = 1000 parameters, N = 2, fp32: parameters 4 bytes, gradients 4, Adam momentum + variance 8.
    expected = [
        {"params": 4000, "grads": 4000, "optimizer": 8000, "total": 16000},  # 16 Psi
        {"params": 4000, "grads": 4000, "optimizer": 4000, "total": 12000},  # 8 Psi + 8 Psi / N
        {"params": 4000, "grads": 2000, "optimizer": 4000, "total": 10000},  # 4 Psi + 12 Psi / N
        {"params": 2000, "grads": 2000, "optimizer": 4000, "total": 8000},   # 16 Psi / N
    ]
    assert [zero_memory.formula_bytes(s, 1000, 2) for s in range(4)] == expected


def test_formula_rejects_an_unknown_stage_and_zero_ranks():
    with pytest.raises(ValueError, match="ZeRO stage 4 does not exist"):
        zero_memory.formula_bytes(4, 1000, 2)
    with pytest.raises(ValueError, match="n >= 1"):
        zero_memory.formula_bytes(1, 1000, 0)


def test_views_of_one_storage_are_counted_once():
    flat = torch.zeros(100)  # like ZeRO's flat buffers: parameters are views into one storage
    views = [flat[:60], flat[60:], flat.view(10, 10)]
    other = torch.zeros(7, dtype=torch.float64)
    assert sorted(zero_memory._storages([*views, other, None, torch.empty(0)]).values()) == [56, 400]
