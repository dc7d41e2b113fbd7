"""Pseudo masks for latent classes (CLIP-to-Seg Sec. III-B, Eq. 2 and Algorithm 1; reused by
Split Matching Sec. 3.2), batched over the whole batch on the device.

1. CLIP dense features at positions annotated with a seen class are zeroed (Eq. 2); only the
   unannotated positions are clustered.
2. Seeds: for every window size ``k`` (default {3, 7}, Table X) the features are averaged over
   ``k×k`` windows with stride ``⌊k/2⌋``; every window of every size is an initial centroid
   (:func:`window_seeds`). Seeds may outnumber the positions: over-clustering then merging, so
   empty clusters are normal and dropped.
3. K-means over the unannotated positions (:func:`zeroseg.toolkit.kmeans.batched_kmeans`).
4. Algorithm 1 (:func:`merge_clusters`): while the largest cosine similarity between cluster
   centroids is ≥ λ (default 0.9, not given by the paper), take the row ``i`` of the maximum
   and merge ``i`` with every ``j`` where ``G[i, j] > λ``; remove the merged rows and columns.
   Clusters never merged are dropped (the literal algorithm) unless ``keep_singletons``.
   The paper's line 9 omits ``i`` itself from the merged set while its diagonal is −∞; we include
   it, as METHODS.md reads the algorithm.
5. The merged groups become latent classes ``num_seen + g`` at label resolution:
   ``Ỹ = Y_s + Ỹ_u`` (seen labels always win; latent masks never cover a seen pixel).

Table XII compares this generator (``kmeans``, the paper's "Ours") with two others, which share step 1
(only unannotated positions can become latent classes) and step 5:

* ``panoptic_cut`` (:func:`panoptic_cut_pseudo_masks`, ref. [48]): LaVG's iterative Normalized Cut on the same
  teacher tokens (:mod:`zeroseg.toolkit.normalized_cut`); every cut and the remainder is a latent class.
* ``mask_proposal`` (:func:`proposal_pseudo_masks`, ref. [13]): the masks of a frozen class-agnostic query
  proposal network (zsseg's MaskFormer trained on the seen classes), thresholded, overlaps resolved by the
  argmax of the mask logits, each surviving proposal a latent class.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroseg.toolkit.kmeans import batched_kmeans
from zeroseg.toolkit.normalized_cut import panoptic_cut

__all__ = [
    "window_seeds",
    "merge_clusters",
    "merge_by_similarity",
    "generate_pseudo_masks",
    "panoptic_cut_pseudo_masks",
    "proposal_pseudo_masks",
    "latent_labels",
    "GENERATORS",
]

# CLIP-to-Seg Table XII's rows: Sec. III-B (the paper's), Panoptic Cut [48], Mask Proposal [13]
GENERATORS = ("kmeans", "panoptic_cut", "mask_proposal")


def window_seeds(features: Tensor, window_sizes: Sequence[int]) -> Tensor:
    """Averages of ``features (B, D, h, w)`` over ``k×k`` windows, stride ``max(⌊k/2⌋, 1)``,
    for every ``k``; returns ``(B, S, D)`` with the windows of each size in row-major order."""
    seeds = []
    for k in window_sizes:
        if k < 1 or k > min(features.shape[-2:]):
            raise ValueError(f"pseudo-mask window size {k} does not fit a {tuple(features.shape[-2:])} feature grid")
        pooled = F.avg_pool2d(features, kernel_size=k, stride=max(k // 2, 1))
        seeds.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(seeds, dim=1)


def merge_clusters(centroids: Tensor, cluster_valid: Tensor, threshold: float = 0.9, keep_singletons: bool = False) -> Tensor:
    """Algorithm 1 for a batch: the merged-group index of every cluster, ``-1`` when dropped.

    Args:
        centroids: ``(B, K, D)`` cluster centroids (the updated seed features ``S_d``).
        cluster_valid: ``(B, K)`` clusters that exist (non-empty).
        threshold: λ.
        keep_singletons: give every never-merged valid cluster a group of its own.

    Returns ``(B, K)`` long; groups are numbered 0, 1, … per image in the order Algorithm 1 forms
    them (singletons after the merged groups).
    """
    normalized = F.normalize(centroids.float(), dim=-1)
    return merge_by_similarity(normalized @ normalized.transpose(1, 2), cluster_valid, threshold, keep_singletons)


def merge_by_similarity(similarity: Tensor, cluster_valid: Tensor, threshold: float, keep_singletons: bool = False) -> Tensor:
    """Algorithm 1 on a batch of similarity matrices ``G (B, K, K)``; see :func:`merge_clusters`.

    Ties of the maximum resolve to the first entry in row-major order.
    """
    batch, num_clusters, _ = similarity.shape
    blocked = ~(cluster_valid.unsqueeze(1) & cluster_valid.unsqueeze(2))
    blocked |= torch.eye(num_clusters, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(blocked, float("-inf"))
    group = torch.full((batch, num_clusters), -1, dtype=torch.long, device=similarity.device)
    next_group = torch.zeros(batch, dtype=torch.long, device=similarity.device)
    images = torch.arange(batch, device=similarity.device)
    while True:
        best, flat_index = similarity.reshape(batch, -1).max(dim=1)
        active = best >= threshold
        if not bool(active.any()):
            break
        row = flat_index // num_clusters
        members = similarity[images, row] > threshold
        members[images, row] = True
        members &= active.unsqueeze(1)
        group = torch.where(members, next_group.unsqueeze(1), group)
        next_group += active.long()
        similarity = similarity.masked_fill(members.unsqueeze(2) | members.unsqueeze(1), float("-inf"))
    if keep_singletons:
        lonely = cluster_valid & (group < 0)
        group = torch.where(lonely, next_group.unsqueeze(1) + torch.cumsum(lonely.long(), dim=1) - 1, group)
    return group


def generate_pseudo_masks(
    dense_features: Tensor,
    labels: Tensor,
    num_seen: int,
    ignore_index: int = 255,
    window_sizes: Sequence[int] = (3, 7),
    iterations: int = 10,
    threshold: float = 0.9,
    keep_singletons: bool = False,
    distance: Literal["cosine", "l2"] = "cosine",
) -> Tensor:
    """``Ỹ = Y_s + Ỹ_u`` for a batch.

    Args:
        dense_features: CLIP dense features ``(B, D, h, w)``.
        labels: training labels ``(B, H, W)``: seen class ids ``0..num_seen-1`` or ``ignore_index``.
        num_seen: latent class ``g`` of an image gets the label ``num_seen + g``.
        window_sizes, iterations, threshold, keep_singletons, distance: see the module docstring.

    Returns ``(B, H, W)`` long: seen labels where annotated, latent labels on merged clusters,
    ``ignore_index`` elsewhere.
    """
    batch, _, grid_h, grid_w = dense_features.shape
    grid_labels = F.interpolate(labels.unsqueeze(1).float(), size=(grid_h, grid_w), mode="nearest").squeeze(1).long()
    unannotated = grid_labels == ignore_index
    features = dense_features.float() * unannotated.unsqueeze(1)  # Eq. 2
    seeds = window_seeds(features, window_sizes)
    points = features.flatten(2).transpose(1, 2)
    valid_points = unannotated.flatten(1)
    seed_valid = seeds.norm(dim=-1) > 0  # windows entirely on annotated positions carry no feature
    assignment, centroids, sizes = batched_kmeans(points, valid_points, seeds, seed_valid, iterations, distance)
    group = merge_clusters(centroids, sizes > 0, threshold, keep_singletons)
    point_group = torch.gather(group, 1, assignment.clamp_min(0))
    point_group = torch.where(valid_points & (point_group >= 0), point_group, torch.full_like(point_group, -1))
    return latent_labels(point_group.view(batch, grid_h, grid_w), labels, num_seen, ignore_index)


def latent_labels(segments: Tensor, labels: Tensor, num_seen: int, ignore_index: int = 255) -> Tensor:
    """Step 5: ``Ỹ = Y_s + Ỹ_u`` from latent segment indices ``segments (B, h, w)`` (-1: none) at any grid size,
    resized (nearest) to ``labels (B, H, W)``; seen labels always win."""
    latent = F.interpolate(segments.unsqueeze(1).float(), size=labels.shape[-2:], mode="nearest").squeeze(1).long()
    latent = torch.where(latent >= 0, latent + num_seen, torch.full_like(latent, ignore_index))
    return torch.where(labels != ignore_index, labels, latent)


def _unannotated_grid(labels: Tensor, size: tuple[int, int], ignore_index: int) -> Tensor:
    """Positions of a ``size`` grid whose nearest label is ``ignore_index`` (not annotated with a seen class)."""
    grid_labels = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).long()
    return grid_labels == ignore_index


def panoptic_cut_pseudo_masks(
    dense_features: Tensor,
    labels: Tensor,
    num_seen: int,
    ignore_index: int = 255,
    max_masks: int = 8,
    tau: float = 0.3,
    eps: float = 1e-5,
    min_remaining: int = 5,
    connected_component: bool = True,
    corner_rule: bool = True,
    keep_remainder: bool = True,
) -> Tensor:
    """Table XII's "Panoptic cut" [48]: ``Ỹ = Y_s + Ỹ_u`` with Ỹ_u the iterative Normalized Cut of the teacher's
    dense tokens ``(B, D, h, w)`` over the unannotated positions (:func:`~zeroseg.toolkit.normalized_cut.panoptic_cut`,
    whose knobs these are: LaVG's τ 0.3, 8 masks, stop at ≤ 5 free positions). Cut ``g`` of an image (the remainder
    last) is latent class ``num_seen + g``."""
    grid = dense_features.shape[-2:]
    unannotated = _unannotated_grid(labels, grid, ignore_index)
    segments = panoptic_cut(
        dense_features,
        unannotated,
        max_masks=max_masks,
        tau=tau,
        eps=eps,
        min_remaining=min_remaining,
        connected_component=connected_component,
        corner_rule=corner_rule,
        keep_remainder=keep_remainder,
    )
    return latent_labels(segments, labels, num_seen, ignore_index)


def _best_proposal(
    mask_logits: Tensor, size: Sequence[int], scores: Optional[Tensor], score_threshold: float, query_chunk: int
) -> tuple[Tensor, Tensor]:
    """Per pixel the highest resized mask logit and its query ``(B, H, W)``, ``query_chunk`` queries at a time
    (bilinear resizing acts on each query alone, so the chunks see the values one resize of all would)."""
    best = proposal = None
    for start in range(0, mask_logits.shape[1], query_chunk):
        part = F.interpolate(mask_logits[:, start : start + query_chunk].float(), size=tuple(size), mode="bilinear", align_corners=False)
        if scores is not None:
            part = part.masked_fill((scores[:, start : start + query_chunk] < score_threshold)[:, :, None, None], float("-inf"))
        part_best, part_proposal = part.max(dim=1)
        if best is None:
            best, proposal = part_best, part_proposal
            continue
        better = part_best > best  # strictly: an equal logit stays with the earlier query
        best = torch.where(better, part_best, best)
        proposal = torch.where(better, part_proposal + start, proposal)
    return best, proposal


def proposal_pseudo_masks(
    mask_logits: Tensor,
    labels: Tensor,
    num_seen: int,
    ignore_index: int = 255,
    mask_threshold: float = 0.5,
    scores: Optional[Tensor] = None,
    score_threshold: float = 0.0,
    min_area: float = 0.0,
    query_chunk: int = 16,
) -> Tensor:
    """Table XII's "Mask Proposal" [13]: ``Ỹ = Y_s + Ỹ_u`` from the masks of a frozen class-agnostic proposal network.

    Args:
        mask_logits: ``(B, Q, h, w)`` proposal mask logits (the last decoder layer's, 1/4 of the image); resized
            bilinearly to the labels, as Mask2Former's inference does.
        labels: ``(B, H, W)`` seen labels or ``ignore_index``; only ``ignore_index`` pixels get a latent class.
        num_seen: proposal ``g`` (counted among the kept ones, in query order) becomes class ``num_seen + g``.
        mask_threshold: a pixel joins its best proposal (the argmax of the mask logits: overlaps go to the most
            confident) when that proposal's sigmoid exceeds this (0.5).
        scores: optional ``(B, Q)`` proposal confidences (e.g. 1 − p(no object)); with ``score_threshold`` > 0 the
            proposals below it take no part at all (0: every query competes, the default).
        min_area: a proposal keeping fewer than this fraction of the image's pixels is dropped; its pixels stay
            unlabelled (0: none dropped).
        query_chunk: proposals resized at a time (the best one per pixel is kept across chunks; equal logits go to
            the earlier query, as in one ``max`` over all). Memory: ``B·query_chunk·H·W`` floats instead of
            ``B·Q·H·W`` (Q = 100 at 512², batch 16: 1.7 GB, each copy).

    Returns ``(B, H, W)`` long.
    """
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"mask_proposal mask_threshold={mask_threshold} must be in [0, 1)")
    if query_chunk < 1:
        raise ValueError(f"mask_proposal query_chunk={query_chunk}: expected a positive number of proposals")
    best, proposal = _best_proposal(mask_logits, labels.shape[-2:], scores if score_threshold > 0 else None, score_threshold, query_chunk)
    claimed = (torch.sigmoid(best) > mask_threshold) & (labels == ignore_index)
    proposal = torch.where(claimed, proposal, torch.full_like(proposal, -1))
    batch, num_queries = mask_logits.shape[:2]
    area = torch.zeros(batch, num_queries + 1, dtype=torch.long, device=labels.device)
    area.scatter_add_(1, (proposal + 1).flatten(1), torch.ones_like(proposal).flatten(1))
    area = area[:, 1:]
    kept = area > 0
    if min_area > 0:
        kept &= area >= min_area * labels.shape[-2] * labels.shape[-1]
    rank = torch.where(kept, torch.cumsum(kept.long(), dim=1) - 1, torch.full_like(area, -1))
    segments = torch.gather(rank, 1, proposal.clamp_min(0).flatten(1)).view_as(proposal)
    segments = torch.where(proposal >= 0, segments, torch.full_like(segments, -1))
    latent = torch.where(segments >= 0, segments + num_seen, torch.full_like(segments, ignore_index))
    return torch.where(labels != ignore_index, labels, latent)
