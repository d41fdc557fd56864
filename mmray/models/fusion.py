"""Fusion strategies: how image and text meet. Adding one is adding a registry entry.

A strategy owns its towers, because strategies differ in *where* the towers meet: ``early`` at the input (the
towers are only embeddings), ``hierarchical`` inside the towers, ``attention`` and ``late`` on top of them. Every
strategy is split the same way, so the model and the losses need not know which one they hold:

- ``encode_image(images)`` / ``encode_text(ids)``: the unimodal work, run once per sample;
- ``fuse(image, text)``: the pairwise work, run on matched pairs and on mined negative pairs; returns the ``pooled``
  vector the ITM head reads and the ``memory`` streams a decoder cross-attends to;
- ``forward(image, text, ids)``: the outputs of the objectives this config trains (see mmray.models.objectives).

``provides`` lists the outputs a strategy can produce: the contrastive ones (``image_embeds``, ``text_embeds``,
``logit_scale``) where it keeps separate towers to the end, ``itm_logits``/``itm_labels`` where it fuses, and
``memory`` (fused token states) for the decoder. Config validation checks requested objectives against it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmray.config import ConfigError, ModelConfig
from mmray.models.encoders import ImageEmbedding, TextEmbedding, TextTransformer, VisionTransformer
from mmray.models.layers import FusionBlock, Transformer, key_padding_mask
from mmray.models.objectives import OBJECTIVE_OUTPUTS, objective_weights

CONTRASTIVE = OBJECTIVE_OUTPUTS["contrastive"]
ITM = OBJECTIVE_OUTPUTS["itm"]

# A memory stream: token states (B, S, D_k) and which of them are real, (B, S) bool, or None when all are.
Stream = tuple[torch.Tensor, "torch.Tensor | None"]

FUSIONS: dict[str, type["FusionStrategy"]] = {}


def register_fusion(name: str) -> Callable[[type["FusionStrategy"]], type["FusionStrategy"]]:
    def wrap(cls: type[FusionStrategy]) -> type[FusionStrategy]:
        FUSIONS[name] = cls
        return cls
    return wrap


def take(features: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``index`` of every tensor in an encoder's output dict (to pair an image with another text)."""
    return {k: v[index] for k, v in features.items()}


@torch.no_grad()
def hardest_negatives(ids: torch.Tensor, pad_id: int, vocab_size: int) -> torch.Tensor:
    """For each caption, the index of the most similar *different* caption in the batch: (B, T) -> (B,).

    Similarity is the cosine of bag-of-token counts. Unlike a model's own similarity (ALBEF's ITC) it is hard from
    the first step and needs no trained unimodal space, which ``early`` and ``hierarchical`` do not have; captions
    that differ in one attribute ("red circle" / "blue circle") are the hardest. Identical captions are never
    chosen, so a mined pair is a true negative unless the batch holds nothing else (then the label says so).
    """
    B = ids.shape[0]
    bags = torch.zeros(B, vocab_size, device=ids.device).scatter_add_(1, ids, torch.ones(ids.shape, device=ids.device))
    bags[:, pad_id] = 0
    sim = F.normalize(bags, dim=-1) @ F.normalize(bags, dim=-1).T          # (B, B)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1)                      # (B, B), diagonal included
    return sim.masked_fill(same, float("-inf")).argmax(dim=1)               # (B,)


class FusionStrategy(nn.Module):
    """Base of every strategy: the ITM and contrastive heads, built only for the objectives this config trains."""

    provides: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.pad_id, self.vocab_size = pad_id, vocab_size
        self.objectives = set(objective_weights(cfg))
        self.memory_widths: tuple[int, ...] = ()  # widths of the streams that ``memory`` returns

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        """Rules on the strategy's own config keys; raise ConfigError. Called by config validation."""

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fuse(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict:
        """Pairwise fusion: ``{"pooled": (B, P), "memory": [Stream, ...]}``."""
        raise NotImplementedError

    def memory(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> list[Stream]:
        """The token states a decoder cross-attends to, one stream per width (see ``memory_widths``)."""
        return self.fuse(image, text)["memory"]

    def forward(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
                ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "contrastive" in self.objectives:
            out.update(self.contrast(image, text))
        if "itm" in self.objectives:
            out.update(self.match(image, text, ids))
        return out

    # -- contrastive (strategies whose towers stay separate to the end) --
    def _init_contrastive(self, cfg: ModelConfig) -> None:
        """Projections into one space and the learned temperature, ``logit_scale = log(1 / T)``, as in CLIP."""
        self.image_proj = nn.Linear(cfg.image_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast views every parameter as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature_init)))

    def contrast_image(self, image: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised image embeddings (B, E) in the shared space, from ``encode_image``'s output."""
        return F.normalize(self.image_proj(image["pooled"]), dim=-1)

    def contrast_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised text embeddings (B, E) in the shared space, from ``encode_text``'s output."""
        return F.normalize(self.text_proj(text["pooled"]), dim=-1)

    def contrast(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": self.contrast_image(image),                              # (B, E)
            "text_embeds": self.contrast_text(text),                                 # (B, E)
            "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp().squeeze(0),  # (), at most 100
        }

    # -- image-text matching (strategies that fuse) --
    def _init_itm(self, pooled_width: int) -> None:
        if "itm" in self.objectives:
            # Named "norm"/"proj", so that the optimizer's no-weight-decay rule (by name) recognises the norm.
            self.itm_head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(pooled_width), proj=nn.Linear(pooled_width, 2)))

    def match(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
              ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ITM over B matched pairs, B (negative image, text) and B (image, negative text) pairs, in one fusion pass.

        Labels compare captions, not indices: a pair is a match when the image's own caption equals the text.
        """
        B = ids.shape[0]
        rows = torch.arange(B, device=ids.device)
        neg = hardest_negatives(ids, self.pad_id, self.vocab_size)                  # (B,)
        image_idx = torch.cat([rows, neg, rows])                                     # (3B,)
        text_idx = torch.cat([rows, rows, neg])                                      # (3B,)
        fused = self.fuse(take(image, image_idx), take(text, text_idx))
        return {"itm_logits": self.itm_head(fused["pooled"]),                       # (3B, 2)
                "itm_labels": (ids[image_idx] == ids[text_idx]).all(-1).long()}    # (3B,)


def _towers(cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int,
            max_text_len: int) -> tuple[VisionTransformer, TextTransformer]:
    return (VisionTransformer(image_size, cfg.patch_size, cfg.image_width, cfg.image_depth, cfg.image_heads,
                              cfg.mlp_ratio, cfg.dropout),
            TextTransformer(vocab_size, max_text_len, cfg.text_width, cfg.text_depth, cfg.text_heads, pad_id,
                            cfg.mlp_ratio, cfg.dropout))


class LateCombine(nn.Module):
    """Combines the pooled image and text features into one vector (B, 1, D) for the decoder heads.

    ``concat``: a projection of [image ; text]. ``gated``: ``g * P_i(image) + (1 - g) * P_t(text)`` with a learned
    per-feature gate ``g = sigmoid(W [image ; text])``. Either way the heads see only the two pooled vectors: the
    towers never exchange token-level information, which is what makes the strategy late.
    """

    def __init__(self, mode: str, image_width: int, text_width: int, out_width: int):
        super().__init__()
        self.mode = mode
        if mode == "concat":
            self.proj = nn.Linear(image_width + text_width, out_width)
        elif mode == "gated":
            self.image_proj = nn.Linear(image_width, out_width)
            self.text_proj = nn.Linear(text_width, out_width)
            self.gate = nn.Linear(image_width + text_width, out_width)
        else:
            raise ValueError(f"unknown late_combine {mode!r}; expected 'concat' or 'gated'")
        self.norm = nn.LayerNorm(out_width)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        both = torch.cat([image, text], dim=-1)                                          # (B, Wi + Wt)
        if self.mode == "concat":
            out = self.proj(both)
        else:
            g = torch.sigmoid(self.gate(both))
            out = g * self.image_proj(image) + (1 - g) * self.text_proj(text)
        return self.norm(out)[:, None, :]                                                # (B, 1, D)


@register_fusion("late")
class LateFusion(FusionStrategy):
    """Dual encoder (CLIP): pooled features are projected into one space, L2-normalised and compared by dot product.

    The decoder heads (captioning, VQA) read one vector: the pooled image and text (prompt) features combined by
    concatenation or a gated sum (``model.late_combine``). The towers never meet below that.
    """

    provides = CONTRASTIVE + ("memory",)

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__(cfg, vocab_size, pad_id)
        self.image_encoder, self.text_encoder = _towers(cfg, vocab_size, pad_id, image_size, max_text_len)
        if "contrastive" in self.objectives:
            self._init_contrastive(cfg)
        self.memory_widths = (cfg.text_width,)
        if cfg.decoder_depth > 0:
            self.combine = LateCombine(cfg.late_combine, cfg.image_width, cfg.text_width, cfg.text_width)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.image_encoder(images)

    def encode_text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.text_encoder(ids)

    def memory(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> list[Stream]:
        return [(self.combine(image["pooled"], text["pooled"]), None)]


@register_fusion("early")
class EarlyFusion(FusionStrategy):
    """One joint Transformer over [image patches ; text tokens] with modality embeddings (ViLT-style).

    The towers are embeddings only. The joint stream has the image tower's width and heads and as many blocks as
    both towers together (``image_depth + text_depth``), so its size is comparable with the dual encoder's; text is
    embedded directly at that width (``text_width`` and ``text_heads`` are not used). Attention is bidirectional,
    with padding masked out. ``pooled`` is the joint state of the image [CLS] token.
    """

    provides = ITM + ("memory",)

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__(cfg, vocab_size, pad_id)
        width = cfg.image_width
        self.image_encoder = ImageEmbedding(image_size, cfg.patch_size, width)
        self.text_encoder = TextEmbedding(vocab_size, max_text_len, width, pad_id)
        self.modality_embed = nn.Parameter(torch.randn(2, width) * 0.02)   # row 0: image, row 1: text
        self.transformer = Transformer(width, cfg.image_depth + cfg.text_depth, cfg.image_heads, cfg.mlp_ratio,
                                       cfg.dropout)
        self.ln_final = nn.LayerNorm(width)
        self._init_itm(width)
        self.memory_widths = (width,)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.image_encoder.embed(images) + self.modality_embed[0]}   # (B, 1+N, D)

    def encode_text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.text_encoder.embed(ids) + self.modality_embed[1],       # (B, T, D)
                "mask": ids != self.pad_id}                                            # (B, T)

    def fuse(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict:
        img = image["tokens"]
        mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool, device=img.device), text["mask"]], 1)  # (B, S)
        x = torch.cat([img, text["tokens"]], dim=1)                                    # (B, S=1+N+T, D)
        x = self.ln_final(self.transformer(x, attn_mask=key_padding_mask(mask)))       # (B, S, D)
        return {"pooled": x[:, 0], "memory": [(x, mask)]}


def parse_fusion_layers(cfg: ModelConfig) -> tuple[int, ...]:
    """``model.fusion_layers`` ('1,3') as sorted block indices; empty means after every block of the shallower tower."""
    shallow = min(cfg.image_depth, cfg.text_depth)
    if not cfg.fusion_layers.strip():
        return tuple(range(shallow))
    try:
        layers = sorted({int(part) for part in cfg.fusion_layers.split(",")})
    except ValueError:
        raise ConfigError(f"model.fusion_layers: {cfg.fusion_layers!r} must be comma-separated block indices, "
                          f"e.g. '0,2'.") from None
    if layers[0] < 0 or layers[-1] >= shallow:
        raise ConfigError(f"model.fusion_layers: {cfg.fusion_layers!r} must hold indices from 0 to {shallow - 1} "
                          f"(below min(model.image_depth={cfg.image_depth}, model.text_depth={cfg.text_depth})).")
    return tuple(layers)


@register_fusion("hierarchical")
class HierarchicalFusion(FusionStrategy):
    """Two towers that exchange information at several depths.

    After block ``i`` of both towers, for each ``i`` in ``model.fusion_layers``, an exchange step lets the text
    tokens cross-attend to the image tokens and the image tokens to the (real) text tokens, both from the states
    before the exchange. Between exchanges each tower runs its own blocks; the text blocks stay causal. ``pooled``
    concatenates the image [CLS] state and the last real text token's state.
    """

    provides = ITM + ("memory",)

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__(cfg, vocab_size, pad_id)
        self.image_encoder, self.text_encoder = _towers(cfg, vocab_size, pad_id, image_size, max_text_len)
        self.layers = parse_fusion_layers(cfg)
        iw, tw = cfg.image_width, cfg.text_width
        self.to_image = nn.ModuleList(FusionBlock(iw, tw, cfg.image_heads, cfg.mlp_ratio, cfg.dropout,
                                                  self_attention=False) for _ in self.layers)
        self.to_text = nn.ModuleList(FusionBlock(tw, iw, cfg.text_heads, cfg.mlp_ratio, cfg.dropout,
                                                 self_attention=False) for _ in self.layers)
        self._init_itm(iw + tw)
        self.memory_widths = (iw, tw)

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        parse_fusion_layers(cfg)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.image_encoder.embed(images)}                          # (B, 1+N, Di)

    def encode_text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.text_encoder.embed(ids), "mask": ids != self.pad_id}  # (B, T, Dt), (B, T)

    def fuse(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict:
        xi, xt, mask = image["tokens"], text["tokens"], text["mask"]
        image_blocks, text_blocks = self.image_encoder.transformer.blocks, self.text_encoder.transformer.blocks
        start = 0
        for k, layer in enumerate(self.layers):
            xi = _run(image_blocks[start:layer + 1], xi)
            xt = _run(text_blocks[start:layer + 1], xt, causal=True)
            xi, xt = self.to_image[k](xi, xt, memory_mask=mask), self.to_text[k](xt, xi)
            start = layer + 1
        image_out = self.image_encoder.finish(_run(image_blocks[start:], xi))
        text_out = self.text_encoder.finish(_run(text_blocks[start:], xt, causal=True), mask)
        return {"pooled": torch.cat([image_out["pooled"], text_out["pooled"]], dim=-1),   # (B, Di+Dt)
                "memory": [(image_out["tokens"], None), (text_out["tokens"], mask)]}


def _run(blocks: nn.ModuleList, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
    for block in blocks:
        x = block(x, causal=causal)
    return x


@register_fusion("attention")
class AttentionFusion(FusionStrategy):
    """Cross-attention fusion layers on top of two full towers (ALBEF's multimodal encoder).

    Each of ``model.fusion_depth`` layers lets the text tokens self-attend (bidirectionally, padding masked) and
    cross-attend to the image tokens; with ``model.cross_attention_both_ways`` a parallel stack lets the image
    tokens attend to the text as well. The towers stay separate below the fusion layers, so this strategy also
    provides the contrastive embeddings. ``pooled`` is the fused state of the first text token ([BOS]).
    """

    provides = CONTRASTIVE + ITM + ("memory",)

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__(cfg, vocab_size, pad_id)
        self.image_encoder, self.text_encoder = _towers(cfg, vocab_size, pad_id, image_size, max_text_len)
        iw, tw = cfg.image_width, cfg.text_width
        self.text_layers = nn.ModuleList(FusionBlock(tw, iw, cfg.text_heads, cfg.mlp_ratio, cfg.dropout)
                                         for _ in range(cfg.fusion_depth))
        if cfg.cross_attention_both_ways:
            self.image_layers = nn.ModuleList(FusionBlock(iw, tw, cfg.image_heads, cfg.mlp_ratio, cfg.dropout)
                                              for _ in range(cfg.fusion_depth))
        if "contrastive" in self.objectives:
            self._init_contrastive(cfg)
        self._init_itm(tw)
        self.memory_widths = (iw, tw)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.image_encoder(images)

    def encode_text(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.text_encoder(ids)

    def fuse(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict:
        xi, xt, mask = image["tokens"], text["tokens"], text["mask"]                 # (B, 1+N, Di), (B, T, Dt)
        image_layers = getattr(self, "image_layers", None)
        for k, text_layer in enumerate(self.text_layers):
            fused_text = text_layer(xt, xi, x_mask=mask)
            if image_layers is not None:
                xi = image_layers[k](xi, xt, memory_mask=mask)
            xt = fused_text
        return {"pooled": xt[:, 0], "memory": [(xi, None), (xt, mask)]}
