"""Pixel decoders of the query-based stack: backbone maps (finest first) → per-pixel mask features at
1/4 and multi-scale features for the transformer decoder.

Uniform interface: ``decoder(features) -> (mask_features (B, mask_dim, H/4, W/4), multi_scale)``
where ``multi_scale`` lists ``(B, dim, h, w)`` maps **coarsest first** (Mask2Former's round robin
starts at 1/32).

* :class:`MSDeformPixelDecoder` (Mask2Former, Cheng et al. 2022, Sec. 4): the 1/8, 1/16, 1/32 maps
  are projected (1×1 conv + GroupNorm), refined jointly by a multi-scale deformable-attention
  encoder (6 layers, level embeddings, sine positions), then an FPN step adds the 1/4 map.
* :class:`FPNPixelDecoder` (MaskFormer, Cheng et al. 2021, Sec. 3.4): a plain top-down FPN.

Initialisation and precision follow Mask2Former's ``MSDeformAttnPixelDecoder`` / ``BasePixelDecoder``
(see each class); the deformable pixel decoder always runs in fp32, autocast disabled, as Mask2Former's
``forward_features`` does (its deformable attention has no half-precision path).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.models.deformable_attention import MSDeformAttn

__all__ = ["FPNPixelDecoder", "MSDeformPixelDecoder", "caffe2_xavier_fill", "sine_position_embedding"]


def sine_position_embedding(
    height: int, width: int, dim: int, device=None, dtype=torch.float32, temperature: float = 10000.0
) -> Tensor:
    """DETR's normalised 2-D sine embedding ``(dim, H, W)``: half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sine position embedding: dim {dim} must be divisible by 4")
    feats = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale)[:, None].expand(height, width)
    x = (torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale)[None, :].expand(height, width)
    dim_t = temperature ** (2 * (torch.arange(feats, device=device) // 2) / feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=-1).flatten(2)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=-1).flatten(2)
    return torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1).to(dtype)


def caffe2_xavier_fill(layer: nn.Module) -> None:
    """Caffe2's "XavierFill" as detectron2/fvcore's ``c2_xavier_fill`` applies it: ``kaiming_uniform_`` with
    ``a=1`` (uniform in ±sqrt(3 / fan_in)) on the weight, zero bias."""
    nn.init.kaiming_uniform_(layer.weight, a=1)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def _conv_norm(
    in_channels: int, out_channels: int, kernel: int, groups: int = 32, relu: bool = False, bias: bool = False
) -> nn.Sequential:
    """``Conv2d`` (bias only if asked: a GroupNorm follows) + ``GroupNorm`` (+ ReLU); the conv keeps
    PyTorch's default initialisation (callers apply the reference's)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias),
        nn.GroupNorm(min(groups, out_channels), out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, heads, levels, points)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.dropout(self.attn(src + pos, reference_points, src, spatial_shapes)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class MSDeformPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder.

    Initialisation (Mask2Former's ``MSDeformAttnPixelDecoder`` and ``MSDeformAttnTransformerEncoderOnly``):
    input projections 1×1 conv *with bias* (Xavier-uniform, gain 1, zero bias) + GroupNorm; in the
    encoder every weight matrix Xavier-uniform, then each :class:`MSDeformAttn` re-initialised by its own
    rule (so only the FFN weights keep the Xavier draw; biases keep PyTorch's default); level embeddings
    ``normal_`` (std 1), stored as a raw parameter as in the reference; lateral, output and mask-feature
    convs ``c2_xavier_fill`` (:func:`caffe2_xavier_fill`).

    Precision: the whole forward runs in fp32 with autocast disabled and fp32 inputs, as Mask2Former's
    ``forward_features`` (``@autocast(enabled=False)``, ``features[f].float()``); the outputs are fp32.

    Args:
        in_channels / in_strides: the backbone's levels, finest first (at least two; the last three
            — or fewer — enter the deformable encoder, the ones before it join through the FPN).
        dim: width of the encoder and the multi-scale features (256).
        mask_dim: channels of the per-pixel mask features (256).
        encoder_layers / heads / points / ffn_dim: the deformable encoder (6 / 8 / 4 / 1024).
        transformer_levels: how many of the coarsest levels the encoder refines (3).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        dim: int = 256,
        mask_dim: int = 256,
        encoder_layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
        transformer_levels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError("MSDeformPixelDecoder needs at least two backbone levels")
        self.levels = min(transformer_levels, len(in_channels) - 1)
        self.transformer_channels = list(in_channels)[-self.levels :][::-1]  # coarsest first
        self.fpn_channels = list(in_channels)[: -self.levels][::-1]  # finer levels, coarse to fine
        self.input_proj = nn.ModuleList(_conv_norm(c, dim, 1, bias=True) for c in self.transformer_channels)
        self.level_embed = nn.Parameter(torch.empty(self.levels, dim))
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(dim, heads, self.levels, points, ffn_dim, dropout) for _ in range(encoder_layers)
        )
        self.lateral = nn.ModuleList(_conv_norm(c, dim, 1) for c in self.fpn_channels)
        self.output = nn.ModuleList(_conv_norm(dim, dim, 3, relu=True) for _ in self.fpn_channels)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)
        self.dim = dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former's initialisation (see the class docstring)."""
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        for layer in self.encoder:
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
            layer.attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for conv_norm in [*self.lateral, *self.output]:
            caffe2_xavier_fill(conv_norm[0])
        caffe2_xavier_fill(self.mask_features)

    @staticmethod
    def reference_points(spatial_shapes: Sequence[tuple[int, int]], levels: int, device, dtype) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1], repeated for each level: ``(S, L, 2)``."""
        points = []
        for height, width in spatial_shapes:
            y, x = torch.meshgrid(
                (torch.arange(height, device=device, dtype=dtype) + 0.5) / height,
                (torch.arange(width, device=device, dtype=dtype) + 0.5) / width,
                indexing="ij",
            )
            points.append(torch.stack([x.flatten(), y.flatten()], -1))
        return torch.cat(points)[:, None, :].expand(-1, levels, -1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``features`` finest first → fp32 ``(mask_features, multi_scale)`` whatever the autocast state."""
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            return self._forward_fp32([feature.float() for feature in features])

    def _forward_fp32(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        coarse = list(features)[-self.levels :][::-1]
        projected = [proj(f) for proj, f in zip(self.input_proj, coarse)]
        shapes = [tuple(p.shape[-2:]) for p in projected]
        src = torch.cat([p.flatten(2).transpose(1, 2) for p in projected], dim=1)
        pos = torch.cat(
            [
                (sine_position_embedding(*shape, self.dim, p.device, p.dtype).flatten(1).t() + self.level_embed[i]).unsqueeze(0)
                for i, (shape, p) in enumerate(zip(shapes, projected))
            ],
            dim=1,
        )
        reference = (
            self.reference_points(shapes, self.levels, src.device, src.dtype).unsqueeze(0).expand(src.shape[0], -1, -1, -1)
        )
        for layer in self.encoder:
            src = layer(src, pos, reference, shapes)
        multi_scale = [
            chunk.transpose(1, 2).reshape(src.shape[0], self.dim, *shape)
            for chunk, shape in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        out = multi_scale[-1]
        for lateral, output, feature in zip(self.lateral, self.output, list(features)[: -self.levels][::-1]):
            out = output(lateral(feature) + F.interpolate(out, size=feature.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(out), multi_scale


class FPNPixelDecoder(nn.Module):
    """MaskFormer's pixel decoder: lateral 1×1 + output 3×3 convs, top down from the coarsest level.

    Returns the finest output through a 3×3 conv as mask features and the top-down outputs of the
    three coarsest levels (coarsest first) as multi-scale features. Every conv is initialised by
    ``c2_xavier_fill`` (:func:`caffe2_xavier_fill`), as in Mask2Former's ``BasePixelDecoder``, which
    also runs under the surrounding autocast (no fp32 section).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        channels = list(in_channels)[::-1]  # coarsest first
        self.lateral = nn.ModuleList([nn.Identity()] + [_conv_norm(c, dim, 1) for c in channels[1:]])
        self.output = nn.ModuleList(
            [_conv_norm(channels[0], dim, 3, relu=True)] + [_conv_norm(dim, dim, 3, relu=True) for _ in channels[1:]]
        )
        self.mask_features = nn.Conv2d(dim, mask_dim, 3, padding=1)
        self.dim = dim
        for conv_norm in [*self.lateral[1:], *self.output]:
            caffe2_xavier_fill(conv_norm[0])
        caffe2_xavier_fill(self.mask_features)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        outputs = []
        out = None
        for lateral, output, feature in zip(self.lateral, self.output, list(features)[::-1]):
            if out is None:
                out = output(feature)
            else:
                out = output(lateral(feature) + F.interpolate(out, size=feature.shape[-2:], mode="nearest"))
            outputs.append(out)
        return self.mask_features(out), outputs[:3]
