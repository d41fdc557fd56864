"""Transformer building blocks (pre-LN, as in GPT-2/ViT): attention, FFN, block, stack.

Single-device code: nothing here knows about Ray, DeepSpeed or torch.distributed.
Shapes: B batch, T tokens, D width, H heads, Dh = D // H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Recomputable(nn.Module):
    """A Transformer block whose activations can be recomputed in backward instead of kept from the forward.

    With ``recompute`` on (see :func:`set_activation_checkpointing`) and gradients enabled, a call runs under
    ``torch.utils.checkpoint`` (non-reentrant): the forward keeps only the block's inputs, and backward runs the
    block again (module hooks included, so ZeRO-3 gathers its parameters again) to get what it needs. Dropout
    draws the same masks both times (the RNG state is restored), so gradients are unchanged.
    """

    recompute = False

    def __call__(self, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, on: bool) -> int:
    """Turn recomputation on or off for every block of ``model`` (towers, fusion layers, decoder); returns how many
    blocks there are."""
    blocks = [m for m in model.modules() if isinstance(m, Recomputable)]
    for block in blocks:
        block.recompute = on
    return len(blocks)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)                                    # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, D))                        # (B, T, D)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, width: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(Recomputable):
    """Pre-LN residual block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks; the caller applies the final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal, attn_mask=attn_mask)
        return x


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool, True for real keys -> (B, 1, 1, S), the boolean ``attn_mask`` SDPA broadcasts over heads."""
    return None if mask is None else mask[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` (width D) over a memory of another width (``kv_width``).

    ``project_kv`` is separate so that a decoder can compute the memory's keys and values once per generation.
    """

    def __init__(self, width: int, kv_width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, D = t.shape
        return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)          # (B, H, T, Dh)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)                                    # 2 x (B, S, D)
        return self._split(k), self._split(v)                                      # 2 x (B, H, S, Dh)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        k, v = kv if kv is not None else self.project_kv(memory)
        y = F.scaled_dot_product_attention(self._split(self.q(x)), k, v, attn_mask=key_padding_mask(memory_mask),
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, D))                        # (B, T, D)


class FusionBlock(Recomputable):
    """Pre-LN cross-modal block: [x + SelfAttn(LN(x))], x + CrossAttn(LN(x), LN(memory)), x + FFN(LN(x)).

    With ``self_attention`` it is an ALBEF multimodal-encoder layer; without, it is the exchange step that
    ``hierarchical`` inserts between tower blocks (the towers' own blocks already do self-attention).
    """

    def __init__(self, width: int, kv_width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 self_attention: bool = True):
        super().__init__()
        if self_attention:
            self.ln_self = nn.LayerNorm(width)
            self.attn = MultiHeadAttention(width, heads, dropout)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(kv_width)
        self.cross = CrossAttention(width, kv_width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, x_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "attn"):
            x = x + self.drop(self.attn(self.ln_self(x), attn_mask=key_padding_mask(x_mask)))
        x = x + self.drop(self.cross(self.ln_q(x), self.ln_kv(memory), memory_mask))
        return x + self.mlp(self.ln_mlp(x))
