"""Iterative Normalized Cut on dense features: the "Panoptic Cut" of LaVG (Kang & Cho, "In defense of
lazy visual grounding for open-vocabulary semantic segmentation", ECCV 2024; CLIP-to-Seg ref. [48]),
the second alternative pseudo-mask generator of CLIP-to-Seg Table XII. Batched over images, torch only.

One cut (Shi & Malik's Normalized Cut as TokenCut/LaVG use it), over the positions still free:

1. Affinity ``A_ij = 1`` where ``cos(f_i, f_j) > τ``, else ``ε`` (LaVG's binary graph; ``ε = 1e-5`` keeps
   the graph connected and ``D`` invertible). ``D = diag(Σ_j A_ij)``.
2. The second-smallest generalised eigenvector ``y`` of ``(D − A) y = λ D y``, computed here as
   ``D^{-1/2} z`` where ``z`` is the second eigenvector of ``I − D^{-1/2} A D^{-1/2}`` (same eigenvalues;
   ``yᵀDy = 1``, scipy's normalisation of the generalised problem).
3. Bipartition ``y > mean(y)``. Orientation (LaVG): the foreground is flipped when it holds ≥ 3 of the four
   grid corners (object-centric bias), else when it does not hold the peak ``argmax |y|``; the seed is then
   the peak of the oriented eigenvector.
4. The mask is the 4-connected component of the foreground that holds the seed (TokenCut's ``detect_box``,
   ``scipy.ndimage.label``'s default connectivity); it is removed from the free positions and the next cut
   runs on the rest, up to ``max_masks`` cuts, stopping early once ``min_remaining`` or fewer positions are
   free (LaVG stops at ≤ 5).
5. What no cut took is LaVG's "background" mask, kept as one more segment with ``keep_remainder``.

LaVG cuts DINO key features at 1/8 and refines each mask with a DenseCRF at image resolution; as a pseudo-mask
generator of CLIP-to-Seg (Table XII) the features here are the CLIP teacher's dense tokens, the graph spans the
positions not annotated with a seen class, and there is no CRF. LaVG's defaults: τ 0.3 and 8 masks (its
``predict.py``; its demo uses τ 0.15 and 3 masks).

The eigen-decomposition is ``torch.linalg.eigh`` on the full ``(h·w)²`` matrix of every image at once:
positions outside the graph get the diagonal value 3, above the spectrum of the normalised Laplacian (⊆ [0, 2]),
so they never reach the two smallest eigenpairs and the result equals the eigen-decomposition of the graph's
own sub-matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["thresholded_affinity", "ncut_eigenvector", "seed_component", "panoptic_cut"]

# diagonal of the positions outside the graph: above the normalised Laplacian's spectrum [0, 2]
_OUTSIDE_EIGENVALUE = 3.0


def thresholded_affinity(features: Tensor, tau: float = 0.3, eps: float = 1e-5) -> Tensor:
    """LaVG's binary graph of ``features (B, N, D)``: ``(B, N, N)`` with 1 where the cosine similarity
    exceeds ``tau`` and ``eps`` elsewhere."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"panoptic cut eps={eps} must be in (0, 1]: it is the weight of a non-edge")
    normalized = F.normalize(features.float(), dim=-1)
    cosine = normalized @ normalized.transpose(1, 2)
    return torch.where(cosine > tau, torch.ones_like(cosine), torch.full_like(cosine, eps))


def ncut_eigenvector(affinity: Tensor, valid: Tensor) -> Tensor:
    """The second-smallest generalised eigenvector of ``(D − A) y = λ D y`` on the sub-graph of ``valid``.

    Args:
        affinity: ``(B, N, N)`` symmetric, non-negative.
        valid: ``(B, N)`` the graph's nodes; the others are left out (rows and columns).

    Returns ``(B, N)``: ``y`` with ``yᵀDy = 1`` on the valid nodes (sign arbitrary), 0 elsewhere; all 0 for an
    image with fewer than two valid nodes.
    """
    valid = valid.bool()
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    affinity = affinity.float() * pair
    degree = affinity.sum(dim=-1)
    inv_sqrt = torch.where(valid, degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt(), torch.zeros_like(degree))
    num_nodes = affinity.shape[-1]
    identity = torch.eye(num_nodes, dtype=affinity.dtype, device=affinity.device)
    laplacian = identity - inv_sqrt.unsqueeze(2) * affinity * inv_sqrt.unsqueeze(1)
    laplacian = laplacian + torch.diag_embed((~valid).to(affinity.dtype) * (_OUTSIDE_EIGENVALUE - 1.0))
    _, vectors = torch.linalg.eigh(laplacian)
    if num_nodes < 2:
        return torch.zeros_like(degree)
    y = vectors[..., 1] * inv_sqrt
    return torch.where(valid.sum(dim=1, keepdim=True) >= 2, y, torch.zeros_like(y))


def seed_component(foreground: Tensor, seed: Tensor) -> Tensor:
    """The 4-connected component of ``foreground (B, h, w)`` holding the flat position ``seed (B,)``; empty where
    the seed is not foreground. Grown by repeated 4-neighbour dilation inside the foreground."""
    batch, height, width = foreground.shape
    foreground = foreground.bool()
    component = torch.zeros_like(foreground).flatten(1)
    component[torch.arange(batch, device=seed.device), seed] = True
    component = component.view(batch, height, width) & foreground
    while True:
        padded = F.pad(component.unsqueeze(1).float(), (1, 1, 1, 1)).squeeze(1) > 0
        grown = (component | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]) & foreground
        if torch.equal(grown, component):
            return component
        component = grown


def _corner_count(mask: Tensor) -> Tensor:
    """How many of the four grid corners ``mask (B, h, w)`` holds."""
    return mask[:, 0, 0].long() + mask[:, 0, -1].long() + mask[:, -1, 0].long() + mask[:, -1, -1].long()


def panoptic_cut(
    features: Tensor,
    valid: Tensor,
    max_masks: int = 8,
    tau: float = 0.3,
    eps: float = 1e-5,
    min_remaining: int = 5,
    connected_component: bool = True,
    corner_rule: bool = True,
    keep_remainder: bool = True,
) -> Tensor:
    """Iterative Normalized Cut (LaVG's Panoptic Cut) of ``features (B, D, h, w)`` over ``valid (B, h, w)``.

    Args:
        features: dense features (the CLIP teacher's tokens for CLIP-to-Seg Table XII).
        valid: the positions to segment (the unannotated ones); the others are never part of a mask.
        max_masks: most cuts per image (LaVG's ``N``, 8).
        tau: cosine threshold of the binary affinity (LaVG 0.3).
        eps: weight of a non-edge (1e-5).
        min_remaining: stop cutting an image once this many free positions or fewer remain (LaVG 5).
        connected_component: keep only the seed's 4-connected component of each bipartition (TokenCut's
            ``detect_box``); ``False`` keeps the whole foreground side.
        corner_rule: flip a foreground that holds ≥ 3 grid corners (LaVG); ``False`` orients by the peak only.
        keep_remainder: the free positions after the last cut form one more segment (LaVG's background mask).

    Returns ``(B, h, w)`` long: the index of the segment of every valid position, numbered 0, 1, … per image
    in the order of the cuts (the remainder last); -1 outside ``valid`` and on positions left unassigned.
    """
    if max_masks < 0:
        raise ValueError(f"panoptic cut max_masks={max_masks} must be >= 0")
    # fp32 throughout: a bf16 cosine would move positions across τ, and eigh needs fp32
    with torch.autocast(device_type=features.device.type, enabled=False):
        return _panoptic_cut(
            features, valid, max_masks, tau, eps, min_remaining, connected_component, corner_rule, keep_remainder
        )


def _panoptic_cut(
    features: Tensor,
    valid: Tensor,
    max_masks: int,
    tau: float,
    eps: float,
    min_remaining: int,
    connected_component: bool,
    corner_rule: bool,
    keep_remainder: bool,
) -> Tensor:
    batch, _, height, width = features.shape
    free = valid.bool().reshape(batch, -1).clone()
    inside = free.clone()
    points = features.float().flatten(2).transpose(1, 2)
    affinity = thresholded_affinity(points, tau, eps)  # sub-graphs of later cuts are its sub-blocks
    segments = torch.full((batch, height * width), -1, dtype=torch.long, device=features.device)
    count = torch.zeros(batch, dtype=torch.long, device=features.device)
    images = torch.arange(batch, device=features.device)
    for _ in range(max_masks):
        active = free.sum(dim=1) > max(min_remaining, 1)
        if not bool(active.any()):
            break
        vector = ncut_eigenvector(affinity, free)
        mean = (vector * free).sum(dim=1, keepdim=True) / free.sum(dim=1, keepdim=True).clamp_min(1)
        foreground = (vector > mean) & free
        peak = torch.where(free, vector.abs(), torch.full_like(vector, -1.0)).argmax(dim=1)
        flip = ~foreground[images, peak]
        if corner_rule:
            flip = torch.where(_corner_count(foreground.view(batch, height, width)) >= 3, torch.ones_like(flip), flip)
        foreground = torch.where(flip.unsqueeze(1), free & ~foreground, foreground)
        oriented = torch.where(flip.unsqueeze(1), -vector, vector)
        seed = torch.where(free, oriented, torch.full_like(oriented, float("-inf"))).argmax(dim=1)
        if connected_component:
            mask = seed_component(foreground.view(batch, height, width), seed).flatten(1)
        else:
            mask = foreground
        mask = mask & active.unsqueeze(1)
        took = mask.any(dim=1)
        segments = torch.where(mask, count.unsqueeze(1), segments)
        count = count + took.long()
        free = free & ~mask
    if keep_remainder:
        rest = free & inside
        segments = torch.where(rest, count.unsqueeze(1), segments)
    return segments.view(batch, height, width)
