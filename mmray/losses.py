"""Training objectives. Collectives live here (and in mmray.train), never in model code.

Contrastive loss across data-parallel workers follows OpenCLIP's ``gather_with_grad`` + ``local_loss``: every
worker gathers all workers' embeddings *with autograd*, scores its own rows against all columns, and averages
over its own rows. With gradients averaged across workers (what DeepSpeed does), the loss and the gradients
equal the single-worker loss over the global batch (tests/integration/test_contrastive_equivalence.py).

Image-text matching and captioning need no collective: each pair's (or token's) loss depends on that sample only
(ITM mines its negatives inside the local batch), so the per-worker mean, averaged across workers by DeepSpeed,
is the global mean for equal local batches (for captioning, up to the number of real tokens per worker).

Loss terms are looked up by name: ``compute_losses`` computes every objective whose outputs
(mmray.models.objectives.OBJECTIVE_OUTPUTS) the model returned; the model returns only those the config trains.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmray.models.objectives import OBJECTIVE_OUTPUTS


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


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of match / no-match over (3b, 2) logits: b matched pairs and 2b mined hard negatives."""
    return F.cross_entropy(itm_logits.float(), itm_labels)


def caption_loss(caption_logits: torch.Tensor, caption_targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of (b, T, V) logits against (b, T) targets, averaged over real tokens (pad: -100)."""
    return F.cross_entropy(caption_logits.flatten(0, 1).float(), caption_targets.flatten(), ignore_index=-100)


def vqa_loss(vqa_logits: torch.Tensor, vqa_targets: torch.Tensor) -> torch.Tensor:
    """Answer-token cross-entropy, like captioning; a batch without any question contributes 0 (not NaN)."""
    if not bool((vqa_targets != -100).any()):
        return vqa_logits.sum() * 0.0  # keeps the graph (and DeepSpeed's gradient hooks) connected
    return caption_loss(vqa_logits, vqa_targets)


LOSSES = {"contrastive": contrastive_loss, "itm": itm_loss, "caption": caption_loss, "vqa": vqa_loss}


def compute_losses(outputs: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Named loss terms for every objective present in a model's outputs, plus their weighted sum under ``loss``.

    ``weights`` maps objective names to weights (missing: 1.0; 0 skips the term), as returned by
    ``mmray.models.objectives.objective_weights(cfg.model)``.
    """
    weights = weights or {}
    terms = {name: fn(*(outputs[key] for key in OBJECTIVE_OUTPUTS[name])) for name, fn in LOSSES.items()
             if weights.get(name, 1.0) != 0 and all(key in outputs for key in OBJECTIVE_OUTPUTS[name])}
    if not terms:
        raise ValueError(f"the model outputs ({', '.join(outputs)}) hold no objective; expected the outputs of one "
                         f"of: {OBJECTIVE_OUTPUTS}")
    terms["loss"] = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    return terms
