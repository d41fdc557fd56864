"""Transformer decoder (Vaswani et al.): masked self-attention, cross-attention over fused memory, FFN; pre-LN.

Teacher-forced logits for training (``forward``) and generation by greedy decoding or beam search, both with an
optional KV cache. The cache stores each block's self-attention keys/values of the tokens generated so far, and
the memory's cross-attention keys/values, which are computed once per generation instead of once per step.
Decoding with and without the cache gives the same tokens (tests/unit/test_decoder.py).

Shapes: B batch, T target tokens, S memory tokens, D width, H heads, Dh = D // H, V vocabulary, W beam width.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mmray.models.encoders import TextEmbedding
from mmray.models.layers import MLP, CrossAttention, MultiHeadAttention, Recomputable

Cache = dict[str, torch.Tensor]   # one block's self-attention "k", "v": (B, H, t, Dh)
KV = tuple[torch.Tensor, torch.Tensor]


class DecoderBlock(Recomputable):
    """x + SelfAttn(LN(x)) (causal), x + CrossAttn(LN(x), memory), x + FFN(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.cross = CrossAttention(width, width, heads, dropout)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def self_attend(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """Causal self-attention; with a cache, ``x`` holds only the newest token and sees every cached one."""
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for t in self.attn.qkv(x).split(D, dim=-1))                       # 3 x (B, H, T, Dh)
        if cache is not None:
            if "k" in cache:
                assert T == 1, "with a filled cache, feed one token per step"
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, t+1, Dh)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.attn.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.attn.out(y.transpose(1, 2).reshape(B, T, D))                      # (B, T, D)

    def forward(self, x: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor | None,
                cache: Cache | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attend(self.ln_1(x), cache))
        x = x + self.drop(self.cross(self.ln_2(x), memory_mask=memory_mask, kv=memory_kv))
        return x + self.mlp(self.ln_3(x))


class TextDecoder(nn.Module):
    """Generates text conditioned on memory streams of any widths (a fusion strategy's ``memory``).

    Each stream is normalised and projected to the decoder width, then the streams are concatenated into one
    memory (B, S, D) with a mask of its real tokens.
    """

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, heads: int, pad_id: int,
                 memory_widths: tuple[int, ...], mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.pad_id, self.max_len = pad_id, max_len
        self.embed = TextEmbedding(vocab_size, max_len, width, pad_id)
        self.memory_proj = nn.ModuleList(nn.Sequential(OrderedDict(norm=nn.LayerNorm(w), proj=nn.Linear(w, width)))
                                         for w in memory_widths)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def adapt(self, streams: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and concatenate memory streams: -> memory (B, S, D), mask (B, S) bool (True = real token)."""
        tokens, masks = [], []
        for proj, (x, mask) in zip(self.memory_proj, streams, strict=True):
            tokens.append(proj(x))                                                      # (B, S_k, D)
            masks.append(mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)

    def memory_kv(self, memory: torch.Tensor) -> list[KV]:
        """Every block's cross-attention keys and values of the memory, 2 x (B, H, S, Dh) each."""
        return [block.cross.project_kv(memory) for block in self.blocks]

    def run(self, ids: torch.Tensor, start: int, memory_kv: list[KV], memory_mask: torch.Tensor | None,
            caches: list[Cache] | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens ``ids`` (B, T) at positions ``start .. start+T-1``."""
        x = self.embed.token_embed(ids) + self.embed.pos_embed[:, start:start + ids.shape[1]]   # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, memory_kv[i], memory_mask, None if caches is None else caches[i])
        return self.lm_head(self.ln_final(x))                                           # (B, T, V)

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) where position t predicts ids[:, t + 1]."""
        return self.run(ids, 0, self.memory_kv(memory), memory_mask)

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos_id: int, eos_id: int,
                 max_new_tokens: int | None = None, beam_width: int = 1, use_cache: bool = True,
                 length_penalty: float = 0.0) -> torch.Tensor:
        """Generated ids (B, L) after [BOS], ending with [EOS] then padding, or cut at ``max_new_tokens``.

        ``beam_width`` 1 is greedy decoding. Beam search ranks finished beams by summed log-probability divided by
        ``length ** length_penalty`` (0: no normalisation, so width 1 is exactly greedy).
        """
        max_new = self.max_len - 1 if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new <= self.max_len - 1:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_len - 1} (the decoder's positions), "
                             f"got {max_new}")
        if beam_width == 1:
            seqs = self._greedy(_Stepper(self, memory, memory_mask, use_cache, bos_id), memory.shape[0], bos_id,
                                eos_id, max_new)
        else:
            memory = memory.repeat_interleave(beam_width, dim=0)                        # (B*W, S, D)
            memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(beam_width, dim=0)
            seqs = self._beam(_Stepper(self, memory, memory_mask, use_cache, bos_id), memory.shape[0] // beam_width,
                              beam_width, bos_id, eos_id, max_new, length_penalty)
        real = (seqs != self.pad_id).any(dim=0).nonzero()                               # columns not all padding
        return seqs[:, :int(real.max()) + 1] if len(real) else seqs[:, :1]

    def _greedy(self, step: "_Stepper", B: int, bos_id: int, eos_id: int, max_new: int) -> torch.Tensor:
        seqs = torch.full((B, 1), bos_id, dtype=torch.long, device=step.device)        # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=step.device)
        for _ in range(max_new):
            token = step(seqs).argmax(dim=-1).masked_fill(done, self.pad_id)            # (B,)
            seqs = torch.cat([seqs, token[:, None]], dim=1)                              # (B, t+1)
            done |= token == eos_id
            if done.all():
                break
        return seqs[:, 1:]

    def _beam(self, step: "_Stepper", B: int, W: int, bos_id: int, eos_id: int, max_new: int,
              length_penalty: float) -> torch.Tensor:
        seqs = torch.full((B * W, 1), bos_id, dtype=torch.long, device=step.device)    # (B*W, 1)
        scores = torch.zeros(B, W, device=step.device)
        scores[:, 1:] = float("-inf")            # all beams start equal: keep one, or the first step picks W copies
        done = torch.zeros(B * W, dtype=torch.bool, device=step.device)
        for _ in range(max_new):
            logp = step(seqs).float().log_softmax(dim=-1)                               # (B*W, V)
            logp[done] = float("-inf")
            logp[done, self.pad_id] = 0.0                    # a finished beam continues with padding, at no cost
            V = logp.shape[-1]
            scores, flat = (scores.reshape(-1, 1) + logp).view(B, W * V).topk(W, dim=-1)   # (B, W)
            beam, token = flat // V, (flat % V).view(-1)                                # (B, W), (B*W,)
            index = (torch.arange(B, device=step.device)[:, None] * W + beam).view(-1)  # (B*W,) source beams
            seqs = torch.cat([seqs[index], token[:, None]], dim=1)                      # (B*W, t+1)
            done = done[index] | (token == eos_id)
            step.reorder(index)
            if done.all():
                break
        lengths = (seqs[:, 1:] != self.pad_id).sum(dim=1).clamp(min=1).view(B, W).float()
        best = (scores / lengths ** length_penalty).argmax(dim=-1)                      # (B,)
        return seqs.view(B, W, -1)[torch.arange(B, device=step.device), best, 1:]


class _Stepper:
    """Next-token logits for growing sequences, with or without the KV cache (the two must agree)."""

    def __init__(self, decoder: TextDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None, use_cache: bool,
                 bos_id: int):
        self.decoder, self.memory_mask, self.device = decoder, memory_mask, memory.device
        self.never = [decoder.pad_id, bos_id]                            # tokens that generation must not produce
        self.memory_kv = decoder.memory_kv(memory)                      # once per generation, either way
        self.caches: list[Cache] | None = [{} for _ in decoder.blocks] if use_cache else None

    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after ``seqs`` (B, t); [PAD] and [BOS] are ruled out."""
        if self.caches is None:
            logits = self.decoder.run(seqs, 0, self.memory_kv, self.memory_mask)[:, -1]
        else:
            logits = self.decoder.run(seqs[:, -1:], seqs.shape[1] - 1, self.memory_kv, self.memory_mask,
                                      self.caches)[:, -1]
        return logits.index_fill(-1, torch.tensor(self.never, device=logits.device), float("-inf"))

    def reorder(self, index: torch.Tensor) -> None:
        """Follow beam search's choice of source beams; the memory rows of one sample's beams are identical."""
        for cache in self.caches or []:
            cache["k"], cache["v"] = cache["k"][index], cache["v"][index]
