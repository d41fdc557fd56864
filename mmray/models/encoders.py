"""Image and text towers: a ViT and a causal text Transformer, each returning token states and a pooled vector."""
from __future__ import annotations

import torch
from torch import nn

from mmray.models.layers import Transformer


class VisionTransformer(nn.Module):
    """ViT: patchify with a strided conv, prepend a [CLS] token, add learned positions, pre-LN blocks."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, dropout)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(images)                                  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                              # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)               # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed               # (B, 1+N, D)
        x = self.ln_post(self.transformer(self.ln_pre(x)))            # (B, 1+N, D)
        return {"tokens": x, "pooled": x[:, 0]}                       # pooled: (B, D)


class TextTransformer(nn.Module):
    """GPT-style causal text encoder (as in CLIP); the pooled vector is the state of the last real token.

    Causal masking means each position only sees tokens before it, so right padding never leaks into a real
    token's state and the last real token (EOS for mmray's tokenizer) summarises the whole caption.
    """

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, heads: int, pad_id: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, width) * 0.01)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, dropout)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T = ids.shape
        x = self.token_embed(ids) + self.pos_embed[:, :T]              # (B, T, D)
        x = self.ln_final(self.transformer(x, causal=True))           # (B, T, D)
        lengths = (ids != self.pad_id).sum(dim=1).clamp(min=1)        # (B,)
        pooled = x[torch.arange(B, device=ids.device), lengths - 1]    # (B, D)
        return {"tokens": x, "pooled": pooled, "mask": ids != self.pad_id}
