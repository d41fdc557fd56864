"""The DeepSpeed set-up derived from the typed config: ds_config, the settings rejected before start, and activation
checkpointing in the model's blocks. Engines that build and step with these settings: tests/integration/
test_deepspeed_options.py."""
import pytest
import torch

from mmray import config
from mmray.config import ConfigError
from mmray.losses import compute_losses
from mmray.models.layers import set_activation_checkpointing
from mmray.models.model import MultimodalModel
from mmray.train.engine import build_model, ds_config

TINY = ["model.image_depth=2", "model.text_depth=2", "model.image_width=32", "model.text_width=32",
        "model.image_heads=2", "model.text_heads=2", "model.embed_dim=16", "data.image_size=16", "model.patch_size=8",
        "data.max_text_len=8"]


def test_batch_arithmetic_is_micro_batch_times_accumulation_times_workers():
    cfg = config.load(None, ["train.micro_batch_size=6", "train.grad_accum=3", "train.num_workers=4"])
    ds = ds_config(cfg, world_size=4, on_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (72, 6, 3)
    assert cfg.train.global_batch() == 72 and cfg.train.global_batch(2) == 36


@pytest.mark.parametrize("overrides, on_gpu, zero", [
    ([], False, {"stage": 1}),
    (["train.zero_stage=2", "train.offload_optimizer=cpu"], False,
     {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}),
    (["train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_param=cpu"], True,
     {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
      "offload_param": {"device": "cpu", "pin_memory": True}}),
    (["train.zero_stage=3", "train.offload_param=cpu"], False,
     {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}}),
])
def test_zero_section_carries_the_offload_keys(overrides, on_gpu, zero):
    ds = ds_config(config.load(None, overrides), world_size=2, on_gpu=on_gpu)
    assert ds["zero_optimization"] == zero
    # torch's AdamW on CPU; on GPU DeepSpeed picks its fused Adam, or its CPU Adam when the optimizer is offloaded.
    assert ds["optimizer"]["params"]["torch_adam"] is (not on_gpu)


@pytest.mark.parametrize("precision, on_gpu, bf16, fp16", [
    ("auto", False, False, False), ("fp32", False, False, False), ("auto", True, True, False),
    ("bf16", True, True, False), ("fp16", True, False, True),
])
def test_precision_by_device(precision, on_gpu, bf16, fp16):
    ds = ds_config(config.load(None, [f"train.precision={precision}"]), world_size=1, on_gpu=on_gpu)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)


@pytest.mark.parametrize("overrides, message", [
    (["train.use_gpu=false", "train.precision=bf16"],
     "train.precision=bf16 needs GPUs, but train.use_gpu=false trains on CPU, in fp32 only; set train.precision=fp32 "
     "(or auto), or train.use_gpu=true."),
    (["train.use_gpu=false", "train.precision=fp16"], "train.precision=fp16 needs GPUs, but train.use_gpu=false"),
    (["train.zero_stage=0", "train.offload_optimizer=cpu"],
     "train.offload_optimizer=cpu needs ZeRO (train.zero_stage 1, 2 or 3); train.zero_stage=0 keeps the optimizer "
     "whole on every worker (DeepSpeed would silently ignore the offload)."),
    (["train.zero_stage=2", "train.offload_param=cpu"],
     "train.offload_param=cpu needs train.zero_stage=3 (only ZeRO-3 partitions the parameters; DeepSpeed would "
     "silently ignore the offload), got train.zero_stage=2."),
    (["train.zero_stage=0", "train.offload_param=cpu"], "train.offload_param=cpu needs train.zero_stage=3"),
    (["train.offload_param=nvme"], "train.offload_param: 'nvme' is not allowed; allowed values: 'none', 'cpu'."),
    (["train.collective_timeout_s=0"], "train.collective_timeout_s: 0 is below the minimum 1."),
])
def test_inconsistent_settings_are_rejected_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert message in str(e.value)


def test_half_precision_is_rejected_once_auto_resolves_to_cpu():
    """use_gpu=auto is resolved against the cluster; a CPU-only cluster fails before the workers start."""
    cfg = config.load(None, ["train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"train.precision=bf16 needs GPUs, but this run trains on CPU "
                                          r"\(train.use_gpu=auto and the cluster has no GPU\)"):
        ds_config(cfg, world_size=2, on_gpu=False)


def test_run_name_ignores_how_but_not_where_state_lives():
    base = config.load(None, []).run_name
    assert config.load(None, ["train.collective_timeout_s=60", "train.activation_checkpointing=true"]).run_name == base
    assert config.load(None, ["train.offload_optimizer=cpu"]).run_name != base


def _model(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = config.load(None, [*TINY, *overrides])
    return MultimodalModel(cfg.model, 50, 0, cfg.data.image_size, cfg.data.max_text_len)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(1, 50, (4, 8), generator=g)


def _grads_and_saved(model) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one forward/backward and how many tensors autograd kept from the forward for the backward."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += 1
        return t

    torch.manual_seed(5)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compute_losses(model(*_batch()))["loss"]
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved


@pytest.mark.parametrize("fusion", ["late", "attention", "hierarchical", "early"])
def test_activation_checkpointing_keeps_gradients_and_saves_fewer_tensors(fusion):
    """Every block stack (towers, joint and fusion layers, decoder) recomputes; dropout draws the same masks."""
    overrides = [f"model.fusion={fusion}", "model.decoder_depth=1", "model.dropout=0.1"]
    plain, plain_saved = _grads_and_saved(_model(*overrides))
    model = _model(*overrides)
    blocks = set_activation_checkpointing(model, True)
    recomputed, saved = _grads_and_saved(model)

    depth = {"late": 4, "attention": 4 + 2, "hierarchical": 4 + 2 * 2, "early": 4}[fusion]  # + fusion layers
    assert blocks == depth + 1  # + the decoder block
    assert recomputed.keys() == plain.keys()
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, rtol=1e-5, atol=1e-7), name
    # Each recomputed block keeps its inputs only, instead of every intermediate of its attention and FFN.
    assert saved < plain_saved / 2, (saved, plain_saved)


def test_no_recomputation_without_gradients():
    model = _model()
    set_activation_checkpointing(model, True)
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pytest.fail, lambda t: t):
        model(*_batch())  # checkpoint would save its inputs here


def test_build_model_turns_it_on_from_the_train_config():
    cfg = config.load(None, [*TINY, "train.activation_checkpointing=true", "train.zero_stage=1"])
    model = build_model(cfg, 50, 0, world=1, on_gpu=False)
    flags = {m.recompute for m in model.modules() if hasattr(m, "recompute")}
    assert flags == {True}
    off = build_model(config.load(None, TINY), 50, 0, world=1, on_gpu=False)
    assert {m.recompute for m in off.modules() if hasattr(m, "recompute")} == {False}


def test_zero_buckets_are_capped_at_the_model_size():
    from mmray.train.engine import DEFAULT_BUCKET

    zero2 = ds_config(config.load(None, ["train.zero_stage=2"]), 2, on_gpu=False, n_params=1234)["zero_optimization"]
    assert zero2["reduce_bucket_size"] == zero2["allgather_bucket_size"] == 2048  # 1234 in multiples of 1024
    big = ds_config(config.load(None, ["train.zero_stage=3"]), 2, on_gpu=True, n_params=10**10)["zero_optimization"]
    assert big["reduce_bucket_size"] == DEFAULT_BUCKET
    assert "reduce_bucket_size" not in ds_config(config.load(None, ["train.zero_stage=0"]), 1, False,
                                                 n_params=1234)["zero_optimization"]
    assert "reduce_bucket_size" not in ds_config(config.load(None, ["train.zero_stage=3"]), 1, False)["zero_optimization"]
