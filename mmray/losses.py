"""Training objectives. Collectives live here (and in mmray.train), never in model code.

Contrastive loss across data-parallel workers follows OpenCLIP's ``gather_with_grad`` + ``local_loss``: every
worker gathers all workers' embeddings *with autograd*, scores its own rows against all columns, and averages
over its own rows. With gradients averaged across workers (what DeepSpeed does), the loss and the gradients
equal the single-worker loss over the global batch (tests/integration/test_contrastive_equivalence.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (b, E) from every rank into (W*b, E); gradients flow back to the rank that owns each row."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over the global batch; inputs are this rank's L2-normalised (b, E) embeddings.

    Every rank must pass the same local batch size b (the pipeline guarantees it with equal splits and drop_last).
    """
    all_images = gather_with_grad(image_embeds)                        # (W*b, E)
    all_texts = gather_with_grad(text_embeds)                          # (W*b, E)
    b = image_embeds.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(b, device=image_embeds.device) + rank * b    # positions of our pairs in the global batch
    logits_i2t = logit_scale * image_embeds @ all_texts.T              # (b, W*b)
    logits_t2i = logit_scale * text_embeds @ all_images.T              # (b, W*b)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def compute_losses(outputs: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Named loss terms from a model's outputs, plus their weighted sum under ``loss``."""
    terms = {"contrastive": contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])}
    weights = weights or {}
    terms["loss"] = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    return terms
