"""Named architectures. Larger presets derive from smaller ones, stating only what differs.

A preset is a ModelConfig: everything that shapes the parameters except the inputs. The inputs belong to the data
(``data.image_size``, ``data.max_text_len``) and the tokenizer (vocabulary), because one architecture trains at many
resolutions. What the published parameter counts assume is recorded next to each preset in ``REFERENCE_INPUTS``;
``mmray model info`` counts at those inputs unless told otherwise.
"""
from __future__ import annotations

import dataclasses

from mmray.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The input facts that change parameter counts (position tables, vocabulary) and FLOPs."""

    image_size: int
    context_length: int
    vocab_size: int


TINY = ModelConfig(preset="tiny")
SMALL = dataclasses.replace(TINY, preset="small", embed_dim=256, image_width=256, image_depth=6, image_heads=8,
                            text_width=256, text_depth=4, text_heads=8)
# OpenAI CLIP (Radford et al. 2021, open_clip's model_configs/*.json).
VIT_B_32 = dataclasses.replace(TINY, preset="ViT-B-32", embed_dim=512, patch_size=32, image_width=768,
                               image_depth=12, image_heads=12, text_width=512, text_depth=12, text_heads=8)
VIT_B_16 = dataclasses.replace(VIT_B_32, preset="ViT-B-16", patch_size=16)
VIT_L_14 = dataclasses.replace(VIT_B_16, preset="ViT-L-14", embed_dim=768, patch_size=14, image_width=1024,
                               image_depth=24, image_heads=16, text_width=768, text_heads=12)

PRESETS: dict[str, ModelConfig] = {p.preset: p for p in (TINY, SMALL, VIT_B_32, VIT_B_16, VIT_L_14)}

_SHAPES = Inputs(image_size=64, context_length=32, vocab_size=512)  # the synthetic shapes set's defaults
_CLIP = Inputs(image_size=224, context_length=77, vocab_size=49408)
REFERENCE_INPUTS: dict[str, Inputs] = {"tiny": _SHAPES, "small": _SHAPES,
                                       "ViT-B-32": _CLIP, "ViT-B-16": _CLIP, "ViT-L-14": _CLIP}
# Published dual-encoder parameter counts (open_clip's model profile table), for tests/unit/test_presets.py.
PUBLISHED_PARAMS: dict[str, float] = {"ViT-B-32": 151.28e6, "ViT-B-16": 149.62e6, "ViT-L-14": 427.62e6}
