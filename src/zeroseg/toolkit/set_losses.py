"""Losses of set prediction (per query and per matched mask), shared by the query-based methods
(Split Matching's Eq. 3, DeOP's dice + focal):

* :func:`sigmoid_focal_loss`: the binary focal loss of Lin et al. 2017 (RetinaNet, Eq. 5) on
  independent per-class sigmoid scores, ``α_t (1 − p_t)^γ · BCE``; a query with no target has
  all-zero targets ("none"), as in Deformable DETR's set criterion;
* :func:`soft_iou_loss`: ``1 − (Σ p·t + s) / (Σ p + Σ t − Σ p·t + s)`` per mask (the soft Jaccard
  loss, Rahman & Wang 2016), ``p = sigmoid(logits)``;
* :func:`mask_dice_loss`: ``1 − (2 Σ p·t + s) / (Σ p + Σ t + s)`` per mask (Milletari et al. 2016,
  with Mask2Former's smoothing s = 1).

The mask losses take point logits ``(N, P)`` (masks sampled at P points, or flattened) and return
one value per mask, so the caller chooses the normalisation (Mask2Former divides the sum by the
number of target segments averaged over ranks).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_dice_loss", "sigmoid_focal_loss", "soft_iou_loss"]


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    normalizer: float = 1.0,
) -> Tensor:
    """``Σ weight · α_t (1 − p_t)^γ · BCE(logits, targets) / normalizer`` over every element.

    Args:
        logits: any shape, e.g. ``(B, Q, N)`` query-by-class scores before the sigmoid.
        targets: same shape, 0/1 (float).
        alpha: weight of the positives (``1 − alpha`` for the negatives); ``None`` = no balancing.
        gamma: focusing exponent.
        weight: broadcastable to ``logits``; 0 removes an element (e.g. padded class columns).
        normalizer: the sum is divided by it (the number of target segments for a set criterion).
    """
    logits, targets = logits.float(), targets.float()
    probs = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if weight is not None:
        loss = loss * weight
    return loss.sum() / normalizer


def soft_iou_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-mask soft IoU loss ``(N,)`` of logits and 0/1 targets ``(N, P)``."""
    probs = logits.float().sigmoid()
    targets = targets.float()
    intersection = (probs * targets).sum(-1)
    union = probs.sum(-1) + targets.sum(-1) - intersection
    return 1 - (intersection + smooth) / (union + smooth)


def mask_dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, valid: Optional[Tensor] = None) -> Tensor:
    """Per-mask dice loss ``(N,)`` of logits and 0/1 targets ``(N, P)``; ``valid (N, P)`` (0/1) leaves
    points out of the prediction's sums (the targets are 0 there)."""
    probs = logits.float().sigmoid()
    if valid is not None:
        probs = probs * valid
    targets = targets.float()
    return 1 - (2 * (probs * targets).sum(-1) + smooth) / (probs.sum(-1) + targets.sum(-1) + smooth)
