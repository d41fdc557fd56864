"""bench/data_throughput.py runs end to end at a tiny size: every path reads the same samples, each pass counted (the
benchmark asserts both and exits non-zero otherwise), and the figures it prints agree with one another."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "data_throughput.py"


def test_data_throughput_benchmark_runs_and_its_figures_agree(tmp_path):
    args = ["--samples", "120", "--passes", "2", "--repeats", "1", "--cpus", "2", "--content", "shapes",
            "--source-size", "64", "--image-size", "32"]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert (out["samples"], out["passes"], out["cpus"], out["image_size"]) == (120, 2, 2, 32)
    assert set(out["first_batch_s"]) == {"mmray", "stock", "stock_reader", "mmray_unreserved"}
    rates = ("mmray_samples_per_s", "stock_samples_per_s", "stock_reader_samples_per_s", "unreserved_samples_per_s",
             "decode_limit_samples_per_s_per_core", "decode_limit_all_cores_samples_per_s_per_core")
    assert all(out[k] > 0 for k in rates), {k: out[k] for k in rates}
    # One round (--repeats 1): the goals' ratios are that round's, mmray's run against the same round's stock run
    # and against the mean of the decode-only loops measured just before and after it (the printed limit is the
    # faster of the two, so the ratio to it can only be lower).
    assert len(out["rounds"]) == 1
    assert all(out[f"ratio_{name}"] == value for name, value in out["rounds"][0].items())
    per_core = out["mmray_samples_per_s"] / out["cpus"]
    assert out["mmray_samples_per_s_per_core"] == pytest.approx(per_core, abs=0.06)
    assert out["ratio_vs_stock"] == pytest.approx(out["mmray_samples_per_s"] / out["stock_samples_per_s"], rel=0.01)
    for limit in ("decode_limit_all_cores", "decode_limit"):
        assert out[f"ratio_vs_{limit}_per_core"] >= per_core / out[f"{limit}_samples_per_s_per_core"] * 0.99
    # mmray's workers timed their own decoding: a share of the machine (at most all of it), and a cost per image.
    assert 0 < out["mmray_decode_share_per_core"] <= 1 and 0 < out["mmray_decode_share_per_cpu_s"] <= 1
    assert out["mmray_decode_ms_per_sample"] > 0 and out["decode_limit_all_cores_ms_per_sample"] > 0
    assert out["goals"] == {"ratio_vs_decode_limit_per_core": 0.8, "ratio_vs_stock": 2.0}
