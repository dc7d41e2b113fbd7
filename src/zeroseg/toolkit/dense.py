"""Dense classification pieces shared by the distillation methods (``c2s``, ``chimera``, ``baseline``):
cosine logits against class embeddings, attention pooling (C2S Sec. III-C), region means (C2S Eq. 5),
latent class embeddings and the seen + latent logits of C2S Eq. 7. Methods never import each other;
what two of them share lives here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroseg.inference import resize_logits

__all__ = ["attention_pooled_feature", "cosine_logits", "latent_class_embeddings", "region_means", "seen_and_latent_logits"]


def cosine_logits(pixel_embeddings: Tensor, class_embeddings: Tensor, temperature: float) -> Tensor:
    """``cos(pixel, class) / temperature`` for embeddings ``(B, D, h, w)`` and ``(C, D)`` → ``(B, C, h, w)``."""
    pixels = F.normalize(pixel_embeddings, dim=1)
    classes = F.normalize(class_embeddings, dim=-1).to(pixels.dtype)
    return (pixels.permute(0, 2, 3, 1) @ classes.t()).permute(0, 3, 1, 2) / temperature


def attention_pooled_feature(features: Tensor, query: Tensor) -> Tensor:
    """``F_g = softmax(qᵀF/√D)·Fᵀ`` (Sec. III-C): ``features (B, D, L)``, ``query (B, D)`` → ``(B, D)``."""
    weights = torch.softmax((query.unsqueeze(1) @ features).squeeze(1) / math.sqrt(features.shape[1]), dim=-1)
    return (features @ weights.unsqueeze(-1)).squeeze(-1)


def region_means(features: Tensor, labels: Tensor, region_labels: Tensor, region_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 5: mean of ``features (B, D, h, w)`` over each region ``labels == region_labels[b, r]``.

    ``labels`` are at the feature resolution. Returns the means ``(B, R, D)`` and the pixel
    counts ``(B, R)`` (0 for padding and for regions too small to reach the feature grid).
    """
    masks = labels.flatten(1).unsqueeze(1) == region_labels.unsqueeze(-1)  # (B, R, L)
    masks = (masks & region_valid.unsqueeze(-1)).to(features.dtype)
    counts = masks.sum(-1)
    means = (masks @ features.flatten(2).transpose(1, 2)) / counts.clamp_min(1).unsqueeze(-1)
    return means, counts


def latent_class_embeddings(
    region_embeddings: Tensor, region_labels: Tensor, is_latent: Tensor, num_seen: int
) -> tuple[Tensor, Tensor]:
    """Scatter per-region embeddings ``(B, R, D)`` of latent regions to ``(B, G, D)`` indexed by
    latent class ``label - num_seen``, with ``valid (B, G)`` marking the classes an image has."""
    image_index, slot = torch.nonzero(is_latent, as_tuple=True)
    latent_class = region_labels[image_index, slot] - num_seen
    num_latent = int(latent_class.max()) + 1
    batch = region_embeddings.shape[0]
    embeddings = region_embeddings.new_zeros(batch, num_latent, region_embeddings.shape[-1])
    valid = torch.zeros(batch, num_latent, dtype=torch.bool, device=region_embeddings.device)
    embeddings = embeddings.index_put((image_index, latent_class), region_embeddings[image_index, slot])
    valid[image_index, latent_class] = True
    return embeddings, valid


def seen_and_latent_logits(
    features: Tensor,
    seen_embeddings: Tensor,
    pseudo: Tensor,
    num_seen: int,
    latent: Optional[tuple[Tensor, Tensor]],
    seen_scale: float,
    latent_scale: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Logits ``cat(seen_scale·cos(F, A_s), latent_scale·cos(F, latent_b))`` at label resolution and
    the matching target, for pseudo labels where latent class ``j`` of an image is ``num_seen + j``.

    ``latent`` = ``(embeddings (B, G, D), valid (B, G))`` or ``None`` (no latent region in the
    batch: seen classes only, latent pixels ignored). Latent classes an image lacks get ``-inf``;
    a latent pixel whose class has no embedding (a region below the feature grid) is ignored.
    """
    logits = cosine_logits(features, seen_embeddings, 1 / seen_scale)
    is_latent_pixel = (pseudo >= num_seen) & (pseudo != ignore_index)
    if latent is None:
        target = torch.where(is_latent_pixel, torch.full_like(pseudo, ignore_index), pseudo)
        return resize_logits(logits, pseudo.shape[-2:]), target
    embeddings, valid = latent
    pixels = F.normalize(features, dim=1)
    latent_logits = latent_scale * torch.einsum("bdhw,bgd->bghw", pixels, F.normalize(embeddings, dim=-1))
    # resize before masking absent latent classes with -inf (interpolating -inf gives NaN)
    logits = resize_logits(torch.cat([logits, latent_logits], dim=1), pseudo.shape[-2:])
    absent = torch.cat([valid.new_zeros(valid.shape[0], num_seen), ~valid], dim=1)
    logits = logits.masked_fill(absent.view(*absent.shape, 1, 1), float("-inf"))
    latent_index = (pseudo - num_seen).clamp(0, valid.shape[1] - 1)
    has_embedding = torch.gather(valid, 1, latent_index.flatten(1)).view_as(pseudo)
    target = torch.where(is_latent_pixel & ~has_embedding, torch.full_like(pseudo, ignore_index), pseudo)
    return logits, target
