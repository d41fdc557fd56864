"""Size and cost of a model config, without building its weights: parameter counts per part and training FLOPs.

Models are built on the ``meta`` device, where tensors have shapes but no storage, so a ViT-L/14 is counted in a
second and in no memory.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmray.config import ModelConfig
from mmray.models.model import MultimodalModel
from mmray.models.presets import Inputs

FLOPS_METHOD = ("FLOPs of every matmul, convolution and attention product in one forward and one backward pass "
                "(backward ~ 2x forward), counted by torch.utils.flop_counter on the meta device at batch 2 and "
                "divided by 2; it includes the ITM negative pairs and the captioning memory pass. Norms, softmax "
                "and elementwise ops are not counted (a few percent). For a dual encoder this is close to "
                "6 x (non-embedding parameters x tokens) per tower.")
COUNT_BATCH = 2  # ITM mines a negative from the rest of the batch, so one sample is not representative


def build_on_meta(cfg: ModelConfig, inputs: Inputs) -> MultimodalModel:
    with torch.device("meta"):
        return MultimodalModel(cfg, inputs.vocab_size, 0, inputs.image_size, inputs.context_length)


def parameter_counts(model: MultimodalModel) -> dict[str, int]:
    """Parameters of the image tower, text tower, the rest of the fusion strategy, the decoder, and the total."""
    def count(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    counts = {"image_encoder": count(model.image_encoder), "text_encoder": count(model.text_encoder)}
    counts["fusion"] = count(model.fusion) - counts["image_encoder"] - counts["text_encoder"]
    counts["decoder"] = count(model.decoder)
    counts["total"] = count(model)
    return counts


def train_flops_per_sample(model: MultimodalModel, inputs: Inputs) -> int:
    """See FLOPS_METHOD. Every floating output is summed into one scalar so that backward reaches every part."""
    images = torch.randn(COUNT_BATCH, 3, inputs.image_size, inputs.image_size, device="meta")
    ids = torch.randint(1, inputs.vocab_size, (COUNT_BATCH, inputs.context_length), device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = model(images, ids)
        sum(v.float().sum() for v in outputs.values() if v.is_floating_point()).backward()
    return counter.get_total_flops() // COUNT_BATCH


def model_info(cfg: ModelConfig, inputs: Inputs) -> dict:
    """The JSON summary of ``mmray model info``."""
    model = build_on_meta(cfg, inputs)
    return {"preset": cfg.preset, "fusion": cfg.fusion, "decoder_depth": cfg.decoder_depth,
            "inputs": dataclasses.asdict(inputs), "parameters": parameter_counts(model),
            "train_flops_per_sample": train_flops_per_sample(model, inputs), "flops_method": FLOPS_METHOD}
