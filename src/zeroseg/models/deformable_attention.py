"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Sec. 4.1, Eq. 3) in plain
PyTorch: bilinear sampling with ``grid_sample``, so it runs on CPU and GPU without a compiled
extension. A faster kernel can later replace :func:`multi_scale_deformable_attention` behind the
same signature.

``MSDeformAttn(z_q, p̂_q, {x^l}) = Σ_m W_m [Σ_l Σ_k A_mlqk · W'_m x^l(φ_l(p̂_q) + Δp_mlqk)]``: every
query samples ``n_points`` locations per head and level around its reference point, with offsets
and weights predicted from the query.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The sampling core.

    Args:
        value: ``(B, S, M, D)`` per-head values of all levels, flattened level by level
            (``S = Σ H_l·W_l``).
        spatial_shapes: ``(H_l, W_l)`` per level.
        sampling_locations: ``(B, Q, M, L, P, 2)`` in ``[0, 1]`` (x, y), pixel centres at
            ``(i + 0.5) / W``; outside the map samples are zero.
        attention_weights: ``(B, Q, M, L, P)`` (softmax over L·P already applied).

    Returns ``(B, Q, M·D)``.
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1], align_corners=False
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B·M, Q, P, 2)
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B·M, D, Q, L·P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1)  # (B·M, D, Q)
    return output.view(batch, heads * dim, queries).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Args:
        dim: model width; heads: attention heads (must divide ``dim``); levels: feature levels;
        points: sampling points per head and level (4 in Deformable DETR / Mask2Former).
    """

    def __init__(self, dim: int = 256, heads: int = 8, levels: int = 3, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's ``MSDeformAttn._reset_parameters`` (kept by Mask2Former, which calls it again
        after its encoder-wide Xavier fill): offsets start on a ring of directions growing with the point
        index, uniform attention weights, Xavier-uniform value/output projections with zero biases."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """``query (B, Q, dim)``, ``reference_points (B, Q, L, 2)`` in [0, 1], ``value (B, S, dim)``."""
        batch, queries, _ = query.shape
        heads, levels, points = self.heads, self.levels, self.points
        value = self.value_proj(value).view(batch, value.shape[1], heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))
