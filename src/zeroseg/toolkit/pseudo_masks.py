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
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroseg.toolkit.kmeans import batched_kmeans

__all__ = [
    "window_seeds",
    "merge_clusters",
    "merge_by_similarity",
    "generate_pseudo_masks",
]


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
    latent = (
        F.interpolate(point_group.view(batch, 1, grid_h, grid_w).float(), size=labels.shape[-2:], mode="nearest")
        .squeeze(1)
        .long()
    )
    latent = torch.where(latent >= 0, latent + num_seen, torch.full_like(latent, ignore_index))
    return torch.where(labels != ignore_index, labels, latent)
