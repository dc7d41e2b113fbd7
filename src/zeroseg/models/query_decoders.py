"""Transformer decoders and prediction heads of the query-based mask-classification stack.

* :class:`Mask2FormerDecoder` (Cheng et al. 2022, Sec. 3.2): per layer masked cross-attention
  (each query attends only where its previous prediction's mask is > 0.5; a query whose mask is
  empty attends everywhere), self-attention, FFN; the layers visit the multi-scale features round
  robin (1/32, 1/16, 1/8, …); learnable query features and positions; a prediction before the
  first layer and after every layer (deep supervision).
* :class:`MaskFormerDecoder` (Cheng et al. 2021, Sec. 3.3): DETR's decoder (self-attention,
  cross-attention, FFN) on the coarsest map, a prediction after every layer.
* :class:`QueryHeads`: mask embedding (3-layer MLP) · per-pixel mask features = mask logits;
  class embedding projected to the CLIP joint space and classified by scaled cosine similarity
  against the class text embeddings plus a learnable "no object" embedding (``class_head=text``),
  or class-agnostic (``objectness``: object vs no object; ``none``: masks only).

Decoders return a list of :class:`QueryPrediction`, the last one being the final prediction.

Initialisation follows Mask2Former: every weight matrix of the attention and FFN layers Xavier-uniform
(``SelfAttentionLayer`` / ``CrossAttentionLayer`` / ``FFNLayer._reset_parameters``, DETR's
``Transformer._reset_parameters`` for MaskFormer), the optional input projection ``c2_xavier_fill``, query
features, query positions and level embeddings ``nn.Embedding`` (N(0, 1)), the heads PyTorch's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.models.pixel_decoders import caffe2_xavier_fill, sine_position_embedding

__all__ = [
    "AttentionLayer",
    "FFNLayer",
    "Mask2FormerDecoder",
    "MaskFormerDecoder",
    "QueryHeads",
    "QueryPrediction",
    "attention_mask_from_masks",
]

ClassHead = Literal["text", "objectness", "none"]


@dataclass
class QueryPrediction:
    """One decoder layer's output: ``class_logits (B, Q, K+1)`` (last column: no object; ``None``
    for ``class_head=none``) and ``mask_logits (B, Q, H/4, W/4)``."""

    class_logits: Optional[Tensor]
    mask_logits: Tensor


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            modules.append(nn.Linear(a, b))
            if i < layers - 1:
                modules.append(nn.ReLU(inplace=True))
        super().__init__(*modules)


class QueryHeads(nn.Module):
    """Per-query class and mask predictions.

    Args:
        dim: query width; mask_dim: per-pixel mask-feature channels; joint_dim: CLIP joint space.
        class_head: ``text`` (cosine vs text embeddings + learnable no-object), ``objectness``
            (2 logits: object, no object) or ``none``.
        temperature: cosine logits are divided by it (0.07, CLIP's).
    """

    def __init__(
        self, dim: int, mask_dim: int, joint_dim: int, class_head: ClassHead = "text", temperature: float = 0.07
    ) -> None:
        super().__init__()
        if class_head not in ("text", "objectness", "none"):
            raise ValueError(f"method.class_head={class_head!r} is not one of ['text', 'objectness', 'none']")
        self.class_head, self.temperature = class_head, temperature
        self.norm = nn.LayerNorm(dim)
        self.mask_embed = MLP(dim, dim, mask_dim, 3)
        if class_head == "text":
            self.class_embed = nn.Linear(dim, joint_dim)
            self.no_object_embedding = nn.Parameter(torch.randn(joint_dim) * joint_dim**-0.5)
        elif class_head == "objectness":
            self.class_embed = nn.Linear(dim, 2)

    def forward(self, queries: Tensor, mask_features: Tensor, class_embeddings: Optional[Tensor] = None) -> QueryPrediction:
        queries = self.norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        if self.class_head == "none":
            return QueryPrediction(None, masks)
        if self.class_head == "objectness":
            return QueryPrediction(self.class_embed(queries), masks)
        if class_embeddings is None:
            raise ValueError("QueryHeads(class_head='text') needs the class text embeddings")
        classes = torch.cat([class_embeddings.to(queries.dtype), self.no_object_embedding[None].to(queries.dtype)])
        logits = F.normalize(self.class_embed(queries), dim=-1) @ F.normalize(classes, dim=-1).t() / self.temperature
        return QueryPrediction(logits, masks)


def attention_mask_from_masks(mask_logits: Tensor, size: Sequence[int], heads: int) -> Tensor:
    """Mask2Former's attention mask ``(B·heads, Q, h·w)``: ``True`` (blocked) where the query's mask,
    resized to ``size``, has sigmoid < 0.5; a query blocked everywhere is unblocked everywhere."""
    resized = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    blocked = (resized.sigmoid().flatten(2) < 0.5).detach()
    blocked[blocked.all(dim=-1)] = False
    return blocked.repeat_interleave(heads, dim=0)


def _xavier_fill_matrices(module: nn.Module) -> None:
    """``xavier_uniform_`` on every parameter with more than one dimension (Mask2Former's attention and FFN
    layers' ``_reset_parameters``: for ``nn.MultiheadAttention`` the packed ``(3·dim, dim)`` input
    projection is one matrix); biases and norms keep their initialisation."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)


class AttentionLayer(nn.Module):
    """Post-norm attention + residual: ``norm(x + attn(x + pos_q, memory + pos_k, memory))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_fill_matrices(self)

    def forward(
        self, x: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Optional[Tensor], attn_mask: Optional[Tensor] = None
    ) -> Tensor:
        keys = memory if memory_pos is None else memory + memory_pos
        out = self.attn(x + query_pos, keys, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(x + out)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm = nn.LayerNorm(dim)
        _xavier_fill_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.ffn(x))


class _QueryDecoderBase(nn.Module):
    def __init__(
        self,
        dim: int,
        num_queries: int,
        in_channels: int,
        heads_module: QueryHeads,
        heads: int,
        layers: int,
        ffn_dim: int,
        dropout: float,
        query_features: bool = True,
        num_levels: int = 1,
    ) -> None:
        super().__init__()
        self.dim, self.num_queries = dim, num_queries
        # per layer: cross-attention, self-attention, FFN (each decoder orders them its own way)
        self.cross = nn.ModuleList(AttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.self_attn = nn.ModuleList(AttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.ffn = nn.ModuleList(FFNLayer(dim, ffn_dim, dropout) for _ in range(layers))
        # Mask2Former learns the initial query features; DETR/MaskFormer start from zeros
        self.query_feat = nn.Embedding(num_queries, dim) if query_features else None
        self.query_pos = nn.Embedding(num_queries, dim)
        # one 1x1 projection per feature level where the pixel decoder is narrower or wider (Mask2Former's
        # input_proj list; MaskFormer has one level)
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == dim else nn.Conv2d(in_channels, dim, 1) for _ in range(num_levels)
        )
        for projection in self.input_proj:
            if isinstance(projection, nn.Conv2d):
                caffe2_xavier_fill(projection)
        self.heads = heads_module

    def _memory(self, feature: Tensor, level: int = 0, level_embed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        feature = self.input_proj[level](feature)
        memory = feature.flatten(2).transpose(1, 2)
        if level_embed is not None:
            memory = memory + level_embed
        pos = sine_position_embedding(*feature.shape[-2:], self.dim, feature.device, feature.dtype).flatten(1).t()
        return memory, pos.unsqueeze(0).expand(feature.shape[0], -1, -1)

    def _queries(self, batch: int) -> tuple[Tensor, Tensor]:
        pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        features = torch.zeros_like(pos) if self.query_feat is None else self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        return features, pos


class Mask2FormerDecoder(_QueryDecoderBase):
    """Mask2Former's masked-attention decoder.

    Args:
        dim / heads / layers / ffn_dim / num_queries: width (256), attention heads (8), decoder
            layers (9), FFN width (2048), queries (100).
        in_channels: channels of the multi-scale features (the pixel decoder's ``dim``).
        num_levels: multi-scale features visited round robin (3).
        heads_module: the :class:`QueryHeads`.
    """

    def __init__(
        self,
        heads_module: QueryHeads,
        in_channels: int = 256,
        dim: int = 256,
        heads: int = 8,
        layers: int = 9,
        ffn_dim: int = 2048,
        num_queries: int = 100,
        num_levels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, num_queries, in_channels, heads_module, heads, layers, ffn_dim, dropout, num_levels=num_levels)
        self.attention_heads, self.num_levels = heads, num_levels
        self.level_embed = nn.Embedding(num_levels, dim)

    def forward(
        self, multi_scale: Sequence[Tensor], mask_features: Tensor, class_embeddings: Optional[Tensor] = None
    ) -> list[QueryPrediction]:
        if len(multi_scale) < self.num_levels:
            raise ValueError(f"Mask2FormerDecoder expects {self.num_levels} feature levels, got {len(multi_scale)}")
        levels = [self._memory(f, i, self.level_embed.weight[i]) for i, f in enumerate(multi_scale[: self.num_levels])]
        sizes = [f.shape[-2:] for f in multi_scale[: self.num_levels]]
        output, query_pos = self._queries(mask_features.shape[0])
        prediction = self.heads(output, mask_features, class_embeddings)
        predictions = [prediction]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.cross, self.self_attn, self.ffn)):
            level = i % self.num_levels
            attn_mask = attention_mask_from_masks(prediction.mask_logits, sizes[level], self.attention_heads)
            memory, pos = levels[level]
            output = cross(output, memory, query_pos, pos, attn_mask)
            output = self_attn(output, output, query_pos, query_pos)
            output = ffn(output)
            prediction = self.heads(output, mask_features, class_embeddings)
            predictions.append(prediction)
        return predictions


class MaskFormerDecoder(_QueryDecoderBase):
    """MaskFormer's (DETR) decoder on the coarsest map: self-attention, cross-attention, FFN per
    layer (6 layers), a prediction after each."""

    def __init__(
        self,
        heads_module: QueryHeads,
        in_channels: int = 256,
        dim: int = 256,
        heads: int = 8,
        layers: int = 6,
        ffn_dim: int = 2048,
        num_queries: int = 100,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, num_queries, in_channels, heads_module, heads, layers, ffn_dim, dropout, query_features=False)

    def forward(
        self, multi_scale: Sequence[Tensor], mask_features: Tensor, class_embeddings: Optional[Tensor] = None
    ) -> list[QueryPrediction]:
        memory, pos = self._memory(multi_scale[0])
        output, query_pos = self._queries(mask_features.shape[0])
        predictions = []
        for self_attn, cross, ffn in zip(self.self_attn, self.cross, self.ffn):
            output = self_attn(output, output, query_pos, query_pos)
            output = cross(output, memory, query_pos, pos)
            output = ffn(output)
            predictions.append(self.heads(output, mask_features, class_embeddings))
        return predictions
