"""DeepSpeed engine set-up, derived from the typed config (the single source of the batch-size arithmetic)."""
from __future__ import annotations

import re

import torch
from torch import nn

from mmray.config import Config, ConfigError
from mmray.models.layers import set_activation_checkpointing

# Parameters that must not be weight-decayed: biases, norms, embeddings/positions and the learned temperature.
_NO_DECAY = ("bias", "ln_", "norm", "token_embed", "pos_embed", "cls_token", "logit_scale", "modality_embed")


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    """fp32, bf16 or fp16; ``auto`` is bf16 on GPU and fp32 on CPU. Half precision on CPU is a ConfigError."""
    if cfg.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if cfg.train.precision in ("bf16", "fp16") and not on_gpu:
        raise ConfigError(f"train.precision={cfg.train.precision} needs GPUs, but this run trains on CPU "
                          f"(train.use_gpu={cfg.train.use_gpu} and the cluster has no GPU), in fp32 only; set "
                          "train.precision=fp32 (or auto), or add GPU nodes.")
    return cfg.train.precision


# DeepSpeed's default communication buckets (elements): the most any model needs of them.
DEFAULT_BUCKET = 500_000_000


def _zero_config(cfg: Config, on_gpu: bool, n_params: int | None = None) -> dict:
    """``zero_optimization``: the stage, where the optimizer state and (ZeRO-3) the parameters live, and the
    gradient-reduction / all-gather buckets.

    Offloaded tensors are pinned on GPU machines (faster host-device copies); pinning needs CUDA. DeepSpeed
    allocates its reduction bucket whole (ZeRO-3: 5e8 elements, 2 GB in fp32 on every rank, whatever the model); a
    bucket larger than the model's ``n_params`` holds nothing more, so the buckets are capped at the model's size
    (rounded up to a multiple of 1024 elements: DeepSpeed wants the all-gather bucket aligned for NCCL)."""
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if n_params is not None and t.zero_stage > 0:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = min(DEFAULT_BUCKET, -(-max(n_params, 1) // 1024) * 1024)
    for key, device in (("offload_optimizer", t.offload_optimizer), ("offload_param", t.offload_param)):
        if device != "none":
            zero[key] = {"device": device, "pin_memory": on_gpu}
    return zero


def ds_config(cfg: Config, world_size: int, on_gpu: bool, n_params: int | None = None) -> dict:
    """The DeepSpeed config: global batch = micro-batch x accumulation x workers, the same numbers the loop uses;
    ``n_params`` (the model's parameter count, when known) sizes the ZeRO buckets.

    Raises ConfigError for what cannot run on the resolved device (see also ``config._check_deepspeed``)."""
    t = cfg.train
    precision = resolve_precision(cfg, on_gpu)
    return {
        "train_batch_size": t.global_batch(world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": _zero_config(cfg, on_gpu, n_params),
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU; on GPU DeepSpeed's fused kernel, or its CPU Adam for an offloaded optimizer.
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


# A tower's parameters after its blocks (its final norm): layer depth + 1, like everything after the tower.
_TOWER_HEAD = ("ln_post", "ln_final")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_ids(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``name -> (layer_id, depth)`` for the parameters of the towers' stacks (BEiT-style layer-wise decay).

    ``layer_id`` is 0 for the embeddings (patch / token / position embeddings, [CLS], ``ln_pre``), ``i + 1`` for
    block ``i`` and ``depth + 1`` for the tower's final norm. ``early`` fusion has towers that are embeddings only;
    its joint Transformer stands in for their blocks (and ``modality_embed`` is an embedding). Parameters not listed
    (projections, fusion layers, decoder, heads, temperature) are after the towers: ``depth + 1`` of any tower.
    """
    fusion = model.fusion
    joint = getattr(fusion, "transformer", None)  # early fusion: one stack over both modalities
    ids: dict[str, tuple[int, int]] = {}

    def stack(prefix: str, module: nn.Module, depth: int) -> None:
        for name, _ in module.named_parameters():
            block = _BLOCK.search(name)
            layer = int(block[1]) + 1 if block else depth + 1 if name.startswith(_TOWER_HEAD) else 0
            ids[prefix + name] = (layer, depth)

    for attr in ("image_encoder", "text_encoder"):
        tower = getattr(fusion, attr)
        blocks = getattr(tower, "transformer", joint)
        stack(f"fusion.{attr}.", tower, len(blocks.blocks) if blocks is not None else 0)
    if joint is not None:
        stack("fusion.transformer.", joint, len(joint.blocks))
        if hasattr(fusion, "modality_embed"):
            ids["fusion.modality_embed"] = (0, len(joint.blocks))
    return ids


def lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Each parameter's learning-rate multiplier: ``layer_decay ** (depth + 1 - layer_id)``, 1 outside the towers."""
    ids = layer_ids(model) if layer_decay != 1.0 else {}
    return {name: layer_decay ** (ids[name][1] + 1 - ids[name][0]) if name in ids else 1.0
            for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 lr: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters: weight decay or not, times one group per learning-rate scale.

    Each group carries ``lr_scale`` and, when ``lr`` is given, ``lr = lr * lr_scale``. DeepSpeed's WarmupCosineLR
    multiplies each group's initial ``lr`` by the same schedule ratio, so the scales hold at every step. Groups are
    ordered by descending scale (the first one trains at the base lr, which the loop logs); empty ones are left out.
    Frozen parameters (``requires_grad`` off) are in no group.
    """
    scales = lr_scales(model, layer_decay)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitioned parameters have empty local data
            no_decay = ndim < 2 or any(s in name for s in _NO_DECAY)
            groups.setdefault((scales[name], no_decay), []).append(p)
    out = []
    for scale, no_decay in sorted(groups, key=lambda k: (-k[0], k[1])):
        group = {"params": groups[scale, no_decay], "weight_decay": 0.0 if no_decay else weight_decay,
                 "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


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


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op when its comm backend starts.

    On the CPU accelerator DeepSpeed builds that C++ op (about 100 s, once per environment) in every process that
    starts ``deepspeed.comm``; only ``inference_all_reduce`` (inference tensor parallelism) uses it. Training's
    collectives all go through ``torch.distributed`` (gloo), so the op is never called here. DeepSpeed asks
    ``deepspeed.ops.__compatible_ops__`` whether it may build the op; marking it incompatible makes it skip the build
    and fall back to ``torch.distributed``, as on a platform without it. Call before DeepSpeed's backend exists.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def count_parameters(model: nn.Module) -> int:
    """Every parameter's element count, whole even when ZeRO-3 has partitioned it (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def build_engine(model: nn.Module, cfg: Config, world_size: int, on_gpu: bool):
    """Wrap ``model`` in a DeepSpeed engine; Ray Train has already created the process group."""
    import deepspeed

    skip_cpu_inference_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay, cfg.train.layer_decay, cfg.train.lr),
        config=ds_config(cfg, world_size, on_gpu, n_params=count_parameters(model)),
        dist_init_required=False,
    )
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    return engine


def deferred_init(cfg: Config) -> bool:
    """Whether the model is built partitioned (inside ``deepspeed.zero.Init``): ZeRO-3 with train.deferred_init."""
    return cfg.train.zero_stage == 3 and cfg.train.deferred_init


def build_model(cfg: Config, vocab_size: int, pad_id: int, world: int, on_gpu: bool) -> nn.Module:
    """The model a worker trains: built (partitioned from birth under ZeRO-3), pretrained towers loaded, towers frozen,
    blocks recomputed in backward with train.activation_checkpointing.

    Under ``deepspeed.zero.Init`` each module's parameters are partitioned across the ranks as soon as the module is
    constructed, so no rank holds the whole model; DeepSpeed gathers one module at a time for the model's own
    ``self.apply(_init_weights)``, and :func:`mmray.models.pretrained.load_tower` is given the same kind of gather:
    rank 0 copies the file's tensors, DeepSpeed broadcasts them and partitions them again. Every rank checks the
    file's keys itself (from its header), so a bad file fails every rank alike, with the same ConfigError.
    Call with the process group up (Ray Train's), after seeding.
    """
    from mmray.models import pretrained
    from mmray.models.model import MultimodalModel

    def construct() -> nn.Module:
        return MultimodalModel(cfg.model, vocab_size, pad_id, cfg.data.image_size, cfg.data.max_text_len)

    gather, write = None, True
    if deferred_init(cfg):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        # deepspeed.comm wraps the process group Ray Train made; zero.Init reads the world size from it.
        skip_cpu_inference_comm_op()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   dist_init_required=False)
        with deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, world, on_gpu)):
            model = construct()

        def gather(params):
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

        write = dist.get_rank() == 0
    else:
        model = construct()
    for source in pretrained.tower_sources(cfg.model):
        pretrained.load_tower(model, source, gather=gather, write=write)
    pretrained.freeze(model, pretrained.parse_freeze(cfg.model.freeze))
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model


def check_finetune(cfg: Config, vocab_size: int, pad_id: int) -> None:
    """Before any worker starts: every pretrained file fits its tower (keys and shapes, from the files' headers) and
    model.freeze leaves something to train. Raises ConfigError. The model is built on the meta device: no memory and
    no weights, whatever the preset."""
    from mmray.models import pretrained
    from mmray.models.model import MultimodalModel

    if not (pretrained.tower_sources(cfg.model) or cfg.model.freeze):
        return
    with torch.device("meta"):
        model = MultimodalModel(cfg.model, vocab_size, pad_id, cfg.data.image_size, cfg.data.max_text_len)
    pretrained.check_sources(cfg.model, model)
