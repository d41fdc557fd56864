"""Named architectures. Larger presets derive from smaller ones, stating only what differs."""
from __future__ import annotations

import dataclasses

from mmray.config import ModelConfig

TINY = ModelConfig(preset="tiny")
SMALL = dataclasses.replace(TINY, preset="small", embed_dim=256, image_width=256, image_depth=6, image_heads=8,
                            text_width=256, text_depth=4, text_heads=8)

PRESETS: dict[str, ModelConfig] = {p.preset: p for p in (TINY, SMALL)}
