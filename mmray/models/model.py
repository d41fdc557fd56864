"""The assembled multimodal model: a fusion strategy from the registry (which owns the towers) and, when the
captioning objective is trained, a Transformer decoder over the strategy's memory."""
from __future__ import annotations

import math

import torch
from torch import nn

from mmray.config import ModelConfig
from mmray.models.decoder import TextDecoder
from mmray.models.fusion import FUSIONS
from mmray.models.objectives import DECODER_OBJECTIVES, objective_weights

IGNORE_INDEX = -100  # caption targets at padding; F.cross_entropy's default ignore_index


class MultimodalModel(nn.Module):
    """``forward(images, text_ids (B,T) long[, question_ids (B,T), answer_ids (B,A)]) -> dict`` of named outputs,
    one group per objective. Images are uint8 pixels (B, S, S, 3) (the data pipeline's batches) or float
    (B, 3, S, S) in [-1, 1].

    ``late`` returns ``image_embeds``, ``text_embeds`` and ``logit_scale`` (CLIP); fusing strategies return
    ``itm_logits`` (3B, 2) and ``itm_labels`` (3B,); with a decoder, ``caption_logits`` (B, T-1, V) and
    ``caption_targets`` (B, T-1), and for VQA ``vqa_logits`` (B, A-1, V) and ``vqa_targets`` (B, A-1): the answer
    decoded from the image fused with the question. Padding is marked IGNORE_INDEX. Outputs of objectives with
    weight 0 are not computed.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, image_size: int, max_text_len: int):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        self.fusion = FUSIONS[cfg.fusion](cfg, vocab_size, pad_id, image_size, max_text_len)
        self.objectives = set(objective_weights(cfg))
        self.decoder = None
        if self.objectives & set(DECODER_OBJECTIVES):
            self.decoder = TextDecoder(vocab_size, max_text_len, cfg.text_width, cfg.decoder_depth, cfg.text_heads,
                                       pad_id, self.fusion.memory_widths, cfg.mlp_ratio, cfg.dropout)
        self.apply(_init_weights)

    @property
    def image_encoder(self) -> nn.Module:
        return self.fusion.image_encoder

    @property
    def text_encoder(self) -> nn.Module:
        return self.fusion.text_encoder

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, question_ids: torch.Tensor | None = None,
                answer_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image, text = self.fusion.encode_image(images), self.fusion.encode_text(text_ids)
        out = self.fusion(image, text, text_ids)
        if "caption" in self.objectives:
            # The memory is fused with the [BOS] prompt only, never with the caption, which it could copy.
            out.update(self._decode("caption", image, text_ids[:, :1], text_ids))
        if "vqa" in self.objectives and question_ids is not None and answer_ids is not None:
            out.update(self._decode("vqa", image, question_ids, answer_ids))
        return out

    def _decode(self, task: str, image: dict[str, torch.Tensor], prompt_ids: torch.Tensor,
                ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher forcing over a memory fused with ``prompt_ids``: input ids[:, :-1], targets ids[:, 1:]."""
        memory, memory_mask = self.memory(image, prompt_ids)
        targets = ids[:, 1:]
        return {f"{task}_logits": self.decoder(ids[:, :-1], memory, memory_mask),              # (B, L-1, V)
                f"{task}_targets": targets.masked_fill(targets == self.pad_id, IGNORE_INDEX)}  # (B, L-1)

    def memory(self, image: dict[str, torch.Tensor], prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder memory (B, S, D) and its mask (B, S) for encoded images fused with a prompt (B, P)."""
        return self.decoder.adapt(self.fusion.memory(image, self.fusion.encode_text(prompt_ids)))

    @torch.no_grad()
    def generate(self, images: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int | None = None,
                 beam_width: int = 1, use_cache: bool = True, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Generated ids (B, L) for images: captions, or with ``prompt_ids`` (B, P), the tokenized questions, VQA
        answers. Greedy (``beam_width`` 1) or beam search; see TextDecoder.generate."""
        if self.decoder is None:
            raise ValueError("this model has no decoder: train it with model.decoder_depth > 0")
        prompt = (torch.full((images.shape[0], 1), bos_id, dtype=torch.long, device=images.device)
                  if prompt_ids is None else prompt_ids)
        memory, memory_mask = self.memory(self.fusion.encode_image(images), prompt)
        return self.decoder.generate(memory, memory_mask, bos_id, eos_id, max_new_tokens, beam_width, use_cache)


INIT_STD, INIT_FAN_IN = 0.02, 768  # GPT-2's weight std, and the fan-in it was chosen for (its 768-wide model)


def init_std(module: nn.Linear | nn.Conv2d) -> float:
    """Weight std of a linear or conv layer: GPT-2's 0.02 at a fan-in of 768, scaled by 1/sqrt(fan-in) elsewhere.

    A fixed 0.02 suits 768-wide models, but each 64-wide layer of the tiny presets would then shrink what passes
    through it about 6-fold (0.02 * sqrt(64) = 0.16), and stacked such layers starve the towers of gradient: the
    embedded default trained to held-out R@1 0.56 / 0.59 with it, 0.75 / 0.81 with this scaling (same machine, same
    500 steps). ViT-B's 768-wide layers keep 0.02; its 3072-in FFN outputs get 0.01."""
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
    else:
        fan_in = module.in_features
    return INIT_STD * math.sqrt(INIT_FAN_IN / fan_in)


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style init with the weight std scaled by fan-in (see :func:`init_std`): normal weights, zero biases,
    unit LayerNorm; embeddings keep std 0.02 (a lookup has no fan-in)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=init_std(module))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
