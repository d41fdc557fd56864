"""DeepSpeed engine set-up, derived from the typed config (the single source of the batch-size arithmetic)."""
from __future__ import annotations

import torch
from torch import nn

from mmray.config import Config

# Parameters that must not be weight-decayed: biases, norms, embeddings/positions and the learned temperature.
_NO_DECAY = ("bias", "ln_", "norm", "token_embed", "pos_embed", "cls_token", "logit_scale", "modality_embed")


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return cfg.train.precision


def ds_config(cfg: Config, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config: global batch = micro-batch x accumulation x workers, the same numbers the loop uses."""
    t = cfg.train
    precision = resolve_precision(cfg, on_gpu)
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU; DeepSpeed's fused kernel on GPU.
            "params": {"lr": t.lr, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": t.weight_decay,
                       "torch_adam": not on_gpu},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.max_steps, "warmup_num_steps": t.warmup_steps,
                       "warmup_min_ratio": 0.0, "warmup_type": "linear", "cos_min_ratio": t.min_lr_ratio},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(s in name for s in _NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _deepspeed_safe_globals() -> list:
    """The few plain-data DeepSpeed classes that its checkpoints pickle (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints). Allowing these rebuilds
    their instances; it never allows calling arbitrary functions."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str, map_location=None):
    """``torch.load`` with ``weights_only=True``: tensors, containers and the allow-listed DeepSpeed classes only.

    DeepSpeed's own loader uses ``weights_only=False``, which would execute arbitrary code from a tampered file.
    """
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class _WeightsOnlyCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine so that every checkpoint file is loaded by :func:`load_checkpoint_file`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_checkpoint_file(path, map_location)


def build_engine(model: nn.Module, cfg: Config, world_size: int, on_gpu: bool):
    """Wrap ``model`` in a DeepSpeed engine; Ray Train has already created the process group."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=ds_config(cfg, world_size, on_gpu),
        dist_init_required=False,
    )
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    return engine
