"""Dense heads that turn multi-level backbone features into per-pixel embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AllMLPDecodeHead"]


class AllMLPDecodeHead(nn.Module):
    """SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021, Sec. 3.2), ending in an embedding.

    Each level is linearly projected (1×1 conv) to ``width`` channels, upsampled to the finest
    level, concatenated, fused by a 1×1 conv + BatchNorm + ReLU, and projected to ``embed_dim``
    (e.g. the CLIP joint dimension, so pixels can be classified against text embeddings).
    """

    def __init__(self, in_channels: Sequence[int], width: int, embed_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.level_projections = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width * len(in_channels), width, kernel_size=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.embed = nn.Conv2d(width, embed_dim, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        projected = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else proj(f)
            for proj, f in zip(self.level_projections, features)
        ]
        return self.embed(self.dropout(self.fuse(torch.cat(projected, dim=1))))
