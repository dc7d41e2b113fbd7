"""Losses shared by the methods: InfoNCE, softmax focal loss, multi-class dice loss.

All accept an ``ignore_index`` target value and logits whose absent classes are ``-inf``
(per-image class sets, e.g. a varying number of latent classes, padded to one tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "softmax_focal_loss", "dice_loss"]


def info_nce(queries: Tensor, keys: Tensor, targets: Tensor, temperature: float, key_valid: Tensor | None = None) -> Tensor:
    """Mean of ``-log(exp(q·k_t / τ) / Σ_j exp(q·k_j / τ))`` over the queries (L2-normalised).

    Args:
        queries: ``(..., Q, D)``.
        keys: ``(..., K, D)``.
        targets: ``(..., Q)`` index of each query's positive key; ``-1`` excludes a query.
        temperature: τ.
        key_valid: ``(..., K)`` keys that exist (padding otherwise).
    """
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).transpose(-1, -2) / temperature
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.unsqueeze(-2), float("-inf"))
    used = targets >= 0
    if not bool(used.any()):
        return logits.new_zeros(())
    log_probs = logits.log_softmax(dim=-1)
    picked = torch.gather(log_probs, -1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -picked[used].mean()


def _valid_pixels(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-pixel logits ``(P, C)`` and targets ``(P,)`` of the non-ignored pixels."""
    flat_logits = logits.permute(0, *range(2, logits.dim()), 1).reshape(-1, logits.shape[1])
    flat_target = target.reshape(-1)
    keep = flat_target != ignore_index
    return flat_logits[keep].float(), flat_target[keep]


def softmax_focal_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, gamma: float = 2.0) -> Tensor:
    """Multi-class focal loss ``-(1 - p_t)^γ log p_t`` (Lin et al. 2017), mean over labelled pixels."""
    pixel_logits, pixel_target = _valid_pixels(logits, target, ignore_index)
    if not len(pixel_target):
        return logits.new_zeros(()).float()
    log_p = torch.gather(pixel_logits.log_softmax(dim=-1), 1, pixel_target.unsqueeze(1)).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c (2 Σ p_c y_c + s) / (Σ p_c + Σ y_c + s)`` over the classes present in the batch
    (softmax probabilities, labelled pixels only; classes absent from the target are skipped)."""
    pixel_logits, pixel_target = _valid_pixels(logits, target, ignore_index)
    if not len(pixel_target):
        return logits.new_zeros(()).float()
    probabilities = pixel_logits.softmax(dim=-1)
    one_hot = F.one_hot(pixel_target, pixel_logits.shape[1]).float()
    present = one_hot.sum(0) > 0
    intersection = (probabilities * one_hot).sum(0)
    dice = (2 * intersection + smooth) / (probabilities.sum(0) + one_hot.sum(0) + smooth)
    return 1 - dice[present].mean()
