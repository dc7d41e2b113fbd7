"""Classification Anchor Learning (DeOP, Han et al. ICCV 2023, Sec. 4.2): anchor heatmap decoders that
turn the one-pass CLIP features ``F_V`` and the N proposal masks ``M`` into N classification anchor heatmaps
``H``, the heatmap-based pooling ``F_I = H ⊙ F_V`` (Sec. 4.2.2) and the mask-based pooling of the baseline
(Sec. 3.1, OpenSeg's).

* :class:`QueryHeatmapDecoder` — N learnable anchor queries, K standard transformer decoder layers over
  ``F_V`` (default K = 1, Table 5), then the heatmap output layer (Eq. 3):
  ``H = softmax(q·F_V / √d) ∗ M`` after a self-attention over the anchor queries.
* :class:`ConvHeatmapDecoder` — the convolutional counterpart (Eq. 4):
  ``H = σ(conv(CBR_K(… CBR_1(F ∗ M))))``, K conv(3×3, 512)-BN-ReLU layers, softmax over positions.

Shapes: ``features (B, D, h, w)`` (the CLIP dense tokens, D = joint dim), ``masks (B, N, h, w)`` soft
proposal masks in [0, 1] on the same grid; heatmaps ``(B, N, h·w)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.models.pixel_decoders import sine_position_embedding
from zeroseg.models.query_decoders import AttentionLayer, FFNLayer

__all__ = [
    "ANCHOR_DECODERS",
    "ConvHeatmapDecoder",
    "QueryHeatmapDecoder",
    "build_anchor_decoder",
    "heatmap_pooling",
    "mask_pooling",
]

AnchorDecoder = Literal["query", "conv", "none"]
ANCHOR_DECODERS: tuple[str, ...] = ("query", "conv", "none")


def heatmap_pooling(heatmaps: Tensor, features: Tensor) -> Tensor:
    """Heatmap-based pooling (Sec. 4.2.2) ``F_I = H ⊙ F_V``: ``(B, N, D)`` = Σ_p H[n, p] · F_V[:, p]
    for ``heatmaps (B, N, h·w)`` (or ``(B, heads, N, h·w)``: head ``g`` pools its own ``D/heads``
    channels, as the public code's multi-head output layer) and ``features (B, D, h, w)``."""
    tokens = features.flatten(2).transpose(1, 2)  # (B, P, D)
    if heatmaps.dim() == 3:
        return heatmaps @ tokens
    batch, heads, queries, positions = heatmaps.shape
    per_head = tokens.reshape(batch, positions, heads, -1).transpose(1, 2)  # (B, heads, P, D/heads)
    return (heatmaps @ per_head).transpose(1, 2).reshape(batch, queries, -1)


def mask_pooling(masks: Tensor, features: Tensor) -> Tensor:
    """Mask-based pooling (the baseline, Sec. 3.1, after OpenSeg): ``(B, N, D)`` = Σ_p M[n, p] F_V[p] / Σ_p M[n, p]."""
    weights = masks.flatten(2)
    return heatmap_pooling(weights / weights.sum(-1, keepdim=True).clamp_min(1e-6), features)


class QueryHeatmapDecoder(nn.Module):
    """The query-based anchor heatmap decoder (Sec. 4.2.1, Fig. 4 right, Eq. 3).

    Anchor query ``n`` belongs to proposal ``n`` (its heatmap is multiplied by ``M_n``), so ``num_queries``
    equals the number of proposals. Decoder layers are DETR's post-norm order (self-attention, cross-
    attention to ``F_V`` with sine positions on the keys, FFN), zero initial queries with learnable query
    positions (the public code); the output layer is a self-attention over the queries then Eq. 3.

    Args:
        dim: D, the width of ``F_V`` (512 for ViT-B/16's joint space).
        num_queries: N (100 in the paper).
        layers: K transformer decoder layers before the output layer (Table 5: 1 best, 3 and 5 similar).
        heads / ffn_dim / dropout: the decoder layers' sizes (public code: 8 / 1024 / 0.1).
        heatmap_heads: heads of the output layer. 1 (default) is Eq. 3 as written, ``d`` = D; the public
            code uses 8, each head pooling its D/8 channels.
        heatmap_projections: ``False`` (default, Eq. 3 as written: ``q·F_V``); ``True`` projects the queries
            and ``F_V`` + sine positions by learnt linear maps first (the public code's output layer).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int = 100,
        layers: int = 1,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        heatmap_heads: int = 1,
        heatmap_projections: bool = False,
    ) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"method.cal.layers={layers!r}: expected K >= 0 decoder layers")
        if dim % heatmap_heads:
            raise ValueError(f"method.cal.heatmap_heads={heatmap_heads!r} must divide the feature width {dim}")
        self.dim, self.num_queries, self.heatmap_heads = dim, num_queries, heatmap_heads
        self.query_pos = nn.Embedding(num_queries, dim)
        self.cross = nn.ModuleList(AttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.self_attn = nn.ModuleList(AttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.ffn = nn.ModuleList(FFNLayer(dim, ffn_dim, dropout) for _ in range(layers))
        # the output layer: a self-attention over the anchor queries, then Eq. 3
        self.output_self_attn = AttentionLayer(dim, heads, dropout)
        self.query_proj = nn.Linear(dim, dim) if heatmap_projections else None
        self.key_proj = nn.Linear(dim, dim) if heatmap_projections else None

    def heatmap_output(self, queries: Tensor, features: Tensor, masks: Tensor, positions: Tensor | None = None) -> Tensor:
        """Eq. 3: ``H = softmax(q·F_V / √d) ∗ M`` for anchor queries ``(B, N, D)`` (after the output layer's
        self-attention), ``features (B, D, h, w)`` and ``masks (B, N, h, w)`` → ``(B, N, h·w)``, or
        ``(B, heads, N, h·w)`` with several heads (softmax over the positions, per head)."""
        keys = features.flatten(2).transpose(1, 2)  # (B, P, D)
        if self.key_proj is not None:
            keys = self.key_proj(keys if positions is None else keys + positions)
            queries = self.query_proj(queries)
        batch, count, _ = queries.shape
        heads = self.heatmap_heads
        head_dim = self.dim // heads
        q = queries.reshape(batch, count, heads, head_dim).transpose(1, 2)
        k = keys.reshape(batch, keys.shape[1], heads, head_dim).transpose(1, 2)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1)  # (B, heads, N, P)
        heatmaps = attention * masks.flatten(2).unsqueeze(1).to(attention.dtype)
        return heatmaps[:, 0] if heads == 1 else heatmaps

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        batch, _, height, width = features.shape
        if masks.shape[1] != self.num_queries:
            raise ValueError(
                f"CAL has {self.num_queries} anchor queries (method.cal.num_queries) but got {masks.shape[1]} proposals: "
                "each anchor query belongs to one proposal"
            )
        memory = features.flatten(2).transpose(1, 2)
        positions = sine_position_embedding(height, width, self.dim, features.device, features.dtype).flatten(1).t()
        positions = positions.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = torch.zeros_like(query_pos)
        for self_attn, cross, ffn in zip(self.self_attn, self.cross, self.ffn):
            queries = self_attn(queries, queries, query_pos=query_pos, memory_pos=query_pos)
            queries = cross(queries, memory, query_pos=query_pos, memory_pos=positions)
            queries = ffn(queries)
        queries = self.output_self_attn(queries, queries, query_pos=query_pos, memory_pos=query_pos)
        # the anchor query of Eq. 3 is the decoded query plus its learnt position (DETR's query = content + position)
        return self.heatmap_output(queries + query_pos, features, masks, positions)


class ConvHeatmapDecoder(nn.Module):
    """The conv-based anchor heatmap decoder (Sec. 4.2.1, Fig. 4 left, Eq. 4): each proposal's weighted map
    ``F ∗ M_n`` → K conv(3×3, ``channels``)-BN-ReLU → a conv to one channel → softmax over positions.

    Args:
        dim: D, the width of ``F_V``.
        layers: K (Table 5 compares K = 3).
        channels: conv width (512 in the paper).
        final_kernel: kernel of the last conv (not given in the paper: default 1).
    """

    def __init__(self, dim: int, layers: int = 3, channels: int = 512, final_kernel: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"method.cal.layers={layers!r}: the conv decoder needs K >= 1 conv-BN-ReLU layers")
        blocks: list[nn.Module] = []
        for index in range(layers):
            blocks += [nn.Conv2d(dim if index == 0 else channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.cbr = nn.Sequential(*blocks)
        self.output = nn.Conv2d(channels, 1, final_kernel, padding=final_kernel // 2)

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        batch, dim, height, width = features.shape
        count = masks.shape[1]
        weighted = (features.unsqueeze(1) * masks.unsqueeze(2).to(features.dtype)).reshape(batch * count, dim, height, width)
        logits = self.output(self.cbr(weighted)).reshape(batch, count, height * width)
        return logits.softmax(dim=-1)


def build_anchor_decoder(
    decoder: AnchorDecoder,
    dim: int,
    num_queries: int,
    layers: int = 1,
    heads: int = 8,
    ffn_dim: int = 1024,
    dropout: float = 0.0,
    heatmap_heads: int = 1,
    heatmap_projections: bool = False,
    conv_channels: int = 512,
) -> nn.Module | None:
    """The CAL module named by ``method.cal.decoder`` (``query`` | ``conv`` | ``none`` = mask-based pooling)."""
    if decoder == "query":
        return QueryHeatmapDecoder(dim, num_queries, layers, heads, ffn_dim, dropout, heatmap_heads, heatmap_projections)
    if decoder == "conv":
        return ConvHeatmapDecoder(dim, layers, conv_channels)
    if decoder == "none":
        return None
    raise ValueError(f"method.cal.decoder={decoder!r} is not one of {list(ANCHOR_DECODERS)}")
