"""The planner's arithmetic against hand-computed cases, and `mmray plan` end to end on the tiny preset."""
import argparse

import pytest

from mmray import config
from mmray.cost import commands, planner, prices
from mmray.cost.planner import PlanInputs

GIB = 1 << 30

# A small table with round numbers, so every expected figure below can be checked by hand.
TABLE = prices.build({
    "as_of": "2026-01", "source": "hand-made for tests", "head_instance_type": "cpu.head",
    "gpu_types": {"G1": {"memory_gib": 16, "bf16_tflops": 100}, "G2": {"memory_gib": 80, "bf16_tflops": 400}},
    "instances": {
        "local": {"on_demand_usd_per_hour": 0.5, "spot_usd_per_hour": 0.5, "gpus": 0, "gpu_type": "", "vcpus": 0,
                  "memory_gib": 0, "gpu_memory_gib": 0},
        "cpu.head": {"on_demand_usd_per_hour": 0.2, "spot_usd_per_hour": 0.1, "gpus": 0, "gpu_type": "",
                     "vcpus": 4, "memory_gib": 16, "gpu_memory_gib": 0},
        "one.g1": {"on_demand_usd_per_hour": 1.0, "spot_usd_per_hour": 0.4, "gpus": 1, "gpu_type": "G1",
                   "vcpus": 4, "memory_gib": 16, "gpu_memory_gib": 16},
        "four.g1": {"on_demand_usd_per_hour": 4.0, "spot_usd_per_hour": 1.2, "gpus": 4, "gpu_type": "G1",
                    "vcpus": 8, "memory_gib": 64, "gpu_memory_gib": 16},
        "eight.g2": {"on_demand_usd_per_hour": 40.0, "spot_usd_per_hour": 20.0, "gpus": 8, "gpu_type": "G2",
                     "vcpus": 96, "memory_gib": 1024, "gpu_memory_gib": 80},
    }}, "test table")


def _cfg(*overrides):
    return config.load(None, ["train.num_workers=4", "train.micro_batch_size=10", "train.grad_accum=2",
                              "train.max_steps=1000", "train.warmup_steps=10", "train.cpus_per_worker=2",
                              *overrides])


@pytest.mark.parametrize("stage, precision, expected", [
    (0, "bf16", 16e6), (1, "bf16", 4e6 + 12e6 / 4), (2, "bf16", 2e6 + 14e6 / 4), (3, "bf16", 16e6 / 4),
    (0, "fp32", 16e6), (1, "fp32", 8e6 + 8e6 / 4), (2, "fp32", 4e6 + 12e6 / 4), (3, "fp16", 4e6),
])
def test_model_state_bytes_follow_the_zero_paper(stage, precision, expected):
    assert planner.model_state_bytes(1_000_000, stage, 4, precision) == pytest.approx(expected)


@pytest.mark.parametrize("stage, offload_param, expected", [
    (1, False, 2e6 + 2e6),            # p + g stay (stage 1 keeps whole gradients); the 12P of Adam go to the host
    (2, False, 2e6),                  # p; the gradient partition goes too
    (3, False, 2e6 / 4),              # p / N
    (3, True, 0.0),                   # everything on the host
])
def test_offload_takes_states_off_the_gpu(stage, offload_param, expected):
    got = planner.model_state_bytes(1_000_000, stage, 4, "bf16", offload_optimizer=True, offload_param=offload_param)
    assert got == pytest.approx(expected)
    cfg = _cfg(f"train.zero_stage={stage}", "train.offload_optimizer=cpu",
               *(["train.offload_param=cpu"] if offload_param else []))
    assert planner.memory_per_gpu(cfg, 1_000_000, 512, False)["model_states_gib"] == pytest.approx(expected / GIB)


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    base = ["data.image_size=16", "model.patch_size=8", "data.max_text_len=4", "train.micro_batch_size=2",
            "model.image_width=8", "model.image_heads=2", "model.image_depth=3", "model.text_width=8",
            "model.text_heads=2", "model.text_depth=1"]
    cfg = config.load(None, [*base, "train.activation_checkpointing=true"])
    inputs = 3 * 2 * 5 * 2 * 8 + 1 * 2 * 4 * 2 * 8                 # 2*s*b*h per layer: 3 image, 1 text
    largest = planner.layer_activation_bytes(5, 2, 8, 2)          # an image layer (5 tokens > 4)
    assert planner.activation_bytes(cfg, 100, itm=False) == pytest.approx(inputs + largest)
    assert planner.activation_bytes(cfg, 100, itm=False) < planner.activation_bytes(config.load(None, base), 100, False)


def test_activation_bytes_hand_computed():
    # s=10 tokens, b=2, h=8, a=2: 10*2*8 * (34 + 5*2*10/8) = 160 * 46.5
    assert planner.layer_activation_bytes(10, 2, 8, 2) == pytest.approx(7440)
    cfg = config.load(None, ["data.image_size=16", "model.patch_size=8", "data.max_text_len=4",
                             "train.micro_batch_size=2", "model.image_width=8", "model.image_heads=2",
                             "model.image_depth=3", "model.text_width=8", "model.text_heads=2", "model.text_depth=1"])
    image = 3 * planner.layer_activation_bytes(5, 2, 8, 2)   # (16/8)^2 + 1 = 5 tokens, 3 blocks
    text = 1 * planner.layer_activation_bytes(4, 2, 8, 2)
    assert image == pytest.approx(3 * 5 * 2 * 8 * (34 + 5 * 2 * 5 / 8))
    assert planner.activation_bytes(cfg, 100, itm=False) == pytest.approx(image + text)
    assert planner.activation_bytes(cfg, 100, itm=False, precision="fp32") == pytest.approx(2 * (image + text))
    assert planner.activation_bytes(cfg, 100, itm=True) == pytest.approx(3 * (image + text))
    with_decoder = config.load(None, ["data.image_size=16", "model.patch_size=8", "data.max_text_len=4",
                                      "train.micro_batch_size=2", "model.image_width=8", "model.image_heads=2",
                                      "model.image_depth=3", "model.text_width=8", "model.text_heads=2",
                                      "model.text_depth=1", "model.decoder_depth=2"])
    assert planner.activation_bytes(with_decoder, 100, itm=False) == pytest.approx(
        image + 3 * planner.layer_activation_bytes(4, 2, 8, 2) + 8 * 2 * 4 * 100)  # 2 decoder layers + logits


def test_samples_and_throughput():
    cfg = _cfg()
    assert planner.samples_target(cfg) == 1000 * 10 * 2 * 4
    assert planner.per_gpu_throughput(TABLE, "G2", samples_per_s_per_gpu=50, measured_on="G1")[0] == 200
    assert planner.per_gpu_throughput(TABLE, "G1", samples_per_s_per_gpu=50, measured_on="G2")[0] == 12.5
    sps, how = planner.per_gpu_throughput(TABLE, "G1", flops_per_sample=1e12, mfu=0.25)
    assert sps == pytest.approx(25.0) and "MFU 0.25" in how  # 100e12 * 0.25 / 1e12


def test_plan_rows_hand_computed():
    """4 workers, 80,000 samples at 50 samples/s per G1 GPU (200 per G2): 200 s on G1 types, 100 s on G2."""
    rows = {(r["instance_type"], r["market"]): r for r in planner.plan_rows(
        _cfg(), TABLE, PlanInputs(params=1_000_000, vocab_size=512, itm=False, samples_per_s_per_gpu=50,
                                  measured_on="G1"))}
    assert set(rows) == {(i, m) for i in ("one.g1", "four.g1", "eight.g2") for m in ("spot", "on-demand")}
    r = rows["one.g1", "spot"]         # 4 nodes x $0.4 + head $0.2 = $1.8/h for 80000 / 200 = 400 s
    assert (r["nodes"], r["samples_per_s"]) == (4, 200)
    assert r["hours"] == pytest.approx(400 / 3600) and r["usd_per_hour"] == pytest.approx(1.8)
    assert r["usd"] == pytest.approx(1.8 * 400 / 3600)
    r = rows["four.g1", "on-demand"]   # 1 node x $4 + $0.2 for 400 s; 4 workers x 2 CPUs = 8 <= 8 vCPUs
    assert r["nodes"] == 1 and r["usd"] == pytest.approx(4.2 * 400 / 3600) and r["fits_cpu"]
    r = rows["eight.g2", "spot"]       # 1 node (4 of 8 GPUs used, all paid) x $20 + $0.2; 4 x 200 samples/s: 100 s
    assert r["nodes"] == 1 and r["hours"] == pytest.approx(100 / 3600)
    assert r["usd"] == pytest.approx(20.2 * 100 / 3600)
    # Memory: 1M params, ZeRO-1 over 4 ranks, bf16: 4e6 + 3e6 bytes of states, the same on every row.
    assert r["memory_gib_needed"] == pytest.approx(planner.memory_per_gpu(_cfg(), 1_000_000, 512, False)["total_gib"])
    mem = planner.memory_per_gpu(_cfg(), 1_000_000, 512, False)
    assert mem["model_states_gib"] == pytest.approx(7e6 / GIB) and mem["overhead_gib"] == 1.0


def test_choice_is_the_cheapest_that_fits_memory_cpu_and_budget():
    inputs = PlanInputs(params=1_000_000, vocab_size=512, itm=False, samples_per_s_per_gpu=50, measured_on="G1")
    summary = planner.plan(_cfg(), TABLE, inputs)
    assert (summary["choice"]["instance_type"], summary["choice"]["market"]) == ("four.g1", "spot")  # $1.4/h x 400 s
    assert summary["choice"]["usd"] == pytest.approx(1.4 * 400 / 3600)
    # 3 CPUs per worker: 4 x 3 = 12 > 8 vCPUs of four.g1, so one.g1 spot ($1.8/h) wins.
    summary = planner.plan(_cfg("train.cpus_per_worker=3"), TABLE, inputs)
    assert not [r for r in summary["rows"] if r["instance_type"] == "four.g1"][0]["fits_cpu"]
    assert summary["choice"]["instance_type"] == "one.g1"
    # A budget below every plan: nothing fits.
    summary = planner.plan(_cfg("budget.usd=0.1"), TABLE, inputs)
    assert summary["choice"] is None and not any(r["fits_budget"] for r in summary["rows"])
    # ZeRO-0 of 1e9 parameters needs 16e9 bytes (14.9 GiB) + 1 GiB: over 90% of 16 GiB, fine in 80 GiB.
    big = PlanInputs(params=1_000_000_000, vocab_size=512, itm=False, samples_per_s_per_gpu=50, measured_on="G1")
    summary = planner.plan(_cfg("train.zero_stage=0"), TABLE, big)
    assert {r["instance_type"] for r in summary["rows"] if r["fits_memory"]} == {"eight.g2"}
    assert summary["choice"]["instance_type"] == "eight.g2" and summary["choice"]["market"] == "spot"
    # ZeRO-3 splits it by 4: 4e9 bytes (3.7 GiB) + 1 GiB fits a G1 again.
    assert planner.plan(_cfg("train.zero_stage=3"), TABLE, big)["choice"]["instance_type"] == "four.g1"


def test_head_and_local_rows():
    inputs = PlanInputs(params=1_000_000, vocab_size=512, itm=False, samples_per_s_per_gpu=50, measured_on="G1",
                        head="none", cpu_samples_per_s=20)
    rows = {(r["instance_type"], r["market"]): r for r in planner.plan_rows(_cfg(), TABLE, inputs)}
    assert rows["one.g1", "spot"]["usd_per_hour"] == pytest.approx(1.6)  # no head
    local = rows["local", "on-demand"]     # this machine: 20 samples/s in all, $0.5/h: 4000 s
    assert local["samples_per_s"] == pytest.approx(20) and local["hours"] == pytest.approx(4000 / 3600)
    assert local["usd"] == pytest.approx(0.5 * 4000 / 3600) and local["memory_gib_needed"] is None


def test_shard_check():
    assert planner.check_shards(8, 4, 2) == {"shards": 8, "needed": 8, "ok": True}
    assert planner.check_shards(7, 4, 2)["ok"] is False
    assert planner.check_shards(None, 4, 2)["ok"] is None


def test_data_facts_count_or_predict_shards(tmp_path):
    from mmray.data.prepare import prepare_synthetic

    cfg = config.load(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_samples=2600",
                             "data.synthetic_val_samples=100"])
    vocab, shards, how = planner.data_facts(cfg)
    assert shards == 3 and "predicted" in how  # ceil(2500 / 1000) once generated
    root = tmp_path / "prepared"
    prepare_synthetic(str(root), samples=60, seed=1, val_samples=10, samples_per_shard=20)
    vocab, shards, how = planner.data_facts(config.load(None, [f"data.source={root}"]))
    assert shards == 3 and "counted" in how and vocab > 0
    vocab, shards, how = planner.data_facts(config.load(None, [f"data.source={tmp_path / 'nothing'}"]))
    assert shards is None and how.startswith("unknown")


def _parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", "-c")
        sp.add_argument("overrides", nargs="*")

    commands.register(sub, with_config)
    return p


def test_plan_command_on_the_tiny_preset(tmp_path, capsys):
    args = _parser().parse_args(["plan", "--calibrate", "--calibrate-steps", "1", "--samples-per-s-per-gpu", "100",
                                 f"data.cache_dir={tmp_path}", "train.micro_batch_size=4", "budget.usd=50"])
    summary = args.fn(args)
    assert summary["params"] > 0 and summary["flops_per_sample"] > 0
    assert summary["calibration"]["samples_per_s"] > 0
    assert any(r["instance_type"] == "local" for r in summary["rows"])
    assert summary["choice"] is not None and summary["choice"]["ok"]
    assert summary["shards"]["needed"] == 2 * 2 and summary["budget_usd"] == 50
    assert "cheapest" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--measured-on", "B200"], "--measured-on"),
    (["plan", "--mfu", "0"], "--mfu"),
    (["plan", "--head", "z1.nano"], "--head"),
    (["plan", "train.lrr=1"], "train.lrr"),
])
def test_plan_command_bad_input(argv, needle):
    args = _parser().parse_args(argv)
    with pytest.raises(config.ConfigError, match=needle):
        args.fn(args)
