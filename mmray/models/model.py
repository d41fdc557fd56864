"""The assembled multimodal model: image tower + text tower + a fusion strategy from the registry."""
from __future__ import annotations

import torch
from torch import nn

from mmray.config import ModelConfig
from mmray.models.encoders import TextTransformer, VisionTransformer
from mmray.models.fusion import FUSIONS


class MultimodalModel(nn.Module):
    """``forward(images (B,3,S,S) float, text_ids (B,T) long) -> dict`` of the fusion's named outputs."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = VisionTransformer(image_size, cfg.patch_size, cfg.image_width, cfg.image_depth,
                                               cfg.image_heads, cfg.mlp_ratio, cfg.dropout)
        self.text_encoder = TextTransformer(vocab_size, max_text_len, cfg.text_width, cfg.text_depth, cfg.text_heads,
                                            pad_id, cfg.mlp_ratio, cfg.dropout)
        self.fusion = FUSIONS[cfg.fusion](cfg.image_width, cfg.text_width, cfg.embed_dim, cfg.temperature_init)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fusion(self.image_encoder(images), self.text_encoder(text_ids))


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style init: small normal weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
