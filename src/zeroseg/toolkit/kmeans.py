"""Batched K-means on the device: every image of a batch clustered at once, padded tensors.

Used to turn CLIP dense tokens into pseudo masks (CLIP-to-Seg Sec. III-B, Split Matching
Sec. 3.2) and to measure the toy CLIP's dense tokens. No per-image Python loop: points and
centroids are padded to ``(B, N, D)`` / ``(B, K, D)`` with validity masks; a cluster that loses
all its points keeps its previous centroid and reports size 0 (callers drop empty clusters).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batched_kmeans", "sample_initial_centroids"]

Distance = Literal["cosine", "l2"]


def sample_initial_centroids(
    points: Tensor, valid: Tensor, num_clusters: int, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """``num_clusters`` distinct valid points per image as initial centroids.

    Returns ``(centroids (B, K, D), centroid_valid (B, K))``; an image with fewer valid points
    than ``K`` gets fewer valid centroids.
    """
    scores = torch.rand(valid.shape, generator=generator, device="cpu").to(points.device)
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    picked = scores.topk(min(num_clusters, points.shape[1]), dim=1).indices
    centroids = torch.gather(points, 1, picked.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return centroids, torch.gather(valid, 1, picked)


def batched_kmeans(
    points: Tensor,
    valid: Tensor,
    centroids: Tensor,
    centroid_valid: Tensor,
    iterations: int = 10,
    distance: Distance = "cosine",
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations for a batch of point sets.

    Args:
        points: ``(B, N, D)`` features.
        valid: ``(B, N)`` which points take part.
        centroids: ``(B, K, D)`` initial centroids.
        centroid_valid: ``(B, K)`` which centroids exist (padding otherwise).
        iterations: number of assignment/update rounds.
        distance: ``cosine`` (points and centroids L2-normalised) or ``l2``.

    Returns:
        ``assignment (B, N)`` cluster index per point (-1 for invalid points),
        ``centroids (B, K, D)`` after the last update, ``sizes (B, K)`` points per cluster.
    """
    if distance not in ("cosine", "l2"):
        raise ValueError(f"kmeans distance must be 'cosine' or 'l2', got {distance!r}")
    points = points.float()
    centroids = centroids.float()
    if distance == "cosine":
        points = F.normalize(points, dim=-1)
        centroids = F.normalize(centroids, dim=-1)
    batch, num_clusters, dim = centroids.shape
    invalid_centroid = ~centroid_valid
    # flat (image, cluster) slot of every point; invalid points go to a scratch slot at the end
    image_offset = (torch.arange(batch, device=points.device) * num_clusters).unsqueeze(1)
    scratch = batch * num_clusters
    flat_points = points.reshape(-1, dim)
    assignment = torch.full(valid.shape, -1, dtype=torch.long, device=points.device)
    sizes = torch.zeros(centroid_valid.shape, dtype=points.dtype, device=points.device)
    for _ in range(max(iterations, 1)):
        if distance == "cosine":
            cost = -points @ centroids.transpose(1, 2)
        else:
            cost = torch.cdist(points, centroids)
        cost = cost.masked_fill(invalid_centroid.unsqueeze(1), float("inf"))
        assignment = cost.argmin(dim=-1)
        # scatter-add updates: O(N·D) per iteration, unlike one-hot products (O(N·K·D))
        slots = torch.where(valid, assignment + image_offset, torch.full_like(assignment, scratch)).reshape(-1)
        sums = torch.zeros(scratch + 1, dim, dtype=points.dtype, device=points.device).index_add_(0, slots, flat_points)
        counts = torch.bincount(slots, minlength=scratch + 1).to(points.dtype)
        sizes = counts[:scratch].view(batch, num_clusters)
        updated = sums[:scratch].view(batch, num_clusters, dim) / sizes.clamp_min(1).unsqueeze(-1)
        if distance == "cosine":
            updated = F.normalize(updated, dim=-1)
        # an emptied cluster keeps its centroid so that it may win points back
        centroids = torch.where((sizes > 0).unsqueeze(-1), updated, centroids)
    assignment = torch.where(valid, assignment, torch.full_like(assignment, -1))
    return assignment, centroids, sizes
