"""Image and text towers: a ViT and a causal text Transformer, each returning token states and a pooled vector.

Each tower is its input embedding plus a Transformer. The embedding stages are classes of their own because fusion
strategies meet at different depths: ``early`` needs only the embeddings, ``hierarchical`` runs the towers' blocks
itself in lockstep, ``late`` and ``attention`` run whole towers.
"""
from __future__ import annotations

import torch
from torch import nn

from mmray.models.layers import Transformer


def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB pixels (B, S, S, 3), channels last as the data pipeline ships them, -> float32 (B, 3, S, S) in
    [-1, 1] (``x / 127.5 - 1``, bit for bit what mmray.data.pipeline.decode_image computes in NumPy). Float images
    are taken as already normalised and channels first, (B, 3, S, S)."""
    if images.dtype != torch.uint8:
        return images
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ImageEmbedding(nn.Module):
    """Patchify with a strided conv, prepend a [CLS] token, add learned positions (the ViT input stage).

    Images are uint8 pixels (B, S, S, 3) (the data pipeline's batches) or float32 (B, 3, S, S) already in [-1, 1];
    see normalise_pixels."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, width) * 0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(normalise_pixels(images))                # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                              # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)               # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed            # (B, 1+N, D)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.embed(images)}


class VisionTransformer(ImageEmbedding):
    """ViT: the image embedding, pre-LN blocks, a final LayerNorm; pooled is the [CLS] state."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__(image_size, patch_size, width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, dropout)
        self.ln_post = nn.LayerNorm(width)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.ln_pre(super().embed(images))                     # (B, 1+N, D)

    def finish(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final norm and pooling, for callers that run ``transformer.blocks`` themselves."""
        x = self.ln_post(x)                                           # (B, 1+N, D)
        return {"tokens": x, "pooled": x[:, 0]}                       # pooled: (B, D)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.finish(self.transformer(self.embed(images)))


class TextEmbedding(nn.Module):
    """Token embedding plus learned positions; ``mask`` marks real (non-pad) tokens."""

    def __init__(self, vocab_size: int, max_len: int, width: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, width) * 0.01)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embed(ids) + self.pos_embed[:, :ids.shape[1]]   # (B, T, D)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.embed(ids), "mask": ids != self.pad_id}


class TextTransformer(TextEmbedding):
    """GPT-style causal text encoder (as in CLIP); the pooled vector is the state of the last real token.

    Causal masking means each position only sees tokens before it, so right padding never leaks into a real
    token's state and the last real token (EOS for mmray's tokenizer) summarises the whole caption.
    """

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, heads: int, pad_id: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__(vocab_size, max_len, width, pad_id)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, dropout)
        self.ln_final = nn.LayerNorm(width)

    def finish(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final norm and last-real-token pooling, for callers that run ``transformer.blocks`` themselves."""
        x = self.ln_final(x)                                          # (B, T, D)
        lengths = mask.sum(dim=1).clamp(min=1)                        # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), lengths - 1]  # (B, D)
        return {"tokens": x, "pooled": pooled, "mask": mask}

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.finish(self.transformer(self.embed(ids), causal=True), ids != self.pad_id)
