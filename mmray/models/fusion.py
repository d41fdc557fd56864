"""Fusion strategies: how the image and text towers are combined. Adding one is adding a registry entry.

A fusion module receives both towers' outputs (dicts with ``tokens`` and ``pooled``) and returns a dict of named
outputs. Losses look outputs up by name, so a strategy advertises what it provides in ``provides``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS: dict[str, type[nn.Module]] = {}


def register_fusion(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        FUSIONS[name] = cls
        return cls
    return wrap


@register_fusion("late")
class LateFusion(nn.Module):
    """Dual encoder (CLIP): pooled features are projected into one space, L2-normalised and compared by dot product.

    The temperature is learned as ``logit_scale = log(1 / T)``, clamped to at most log(100) as in CLIP.
    """

    provides = ("image_embeds", "text_embeds", "logit_scale")

    def __init__(self, image_width: int, text_width: int, embed_dim: int, temperature_init: float = 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast views every parameter as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature_init)))

    def forward(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": F.normalize(self.image_proj(image["pooled"]), dim=-1),   # (B, E)
            "text_embeds": F.normalize(self.text_proj(text["pooled"]), dim=-1),      # (B, E)
            "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp().squeeze(0),  # ()
        }
