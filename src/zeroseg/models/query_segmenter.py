"""The query-based stack as one module (Mask2Former / MaskFormer): backbone maps → pixel decoder →
transformer decoder → per-query masks and class scores. Shared by every query method
(``query_baseline``, ``split_matching``; DeOP and MAFT proposals), so it lives with the models."""

from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor, nn

from zeroseg.models.pixel_decoders import FPNPixelDecoder, MSDeformPixelDecoder
from zeroseg.models.query_decoders import Mask2FormerDecoder, MaskFormerDecoder, QueryHeads, QueryPrediction

__all__ = ["QuerySegmenter"]


class QuerySegmenter(nn.Module):
    """The stack as one module: images' backbone maps → list of :class:`QueryPrediction` (one per
    decoder prediction, the last is final).

    Args:
        backbone_channels / backbone_strides: the backbone's levels, finest first.
        joint_dim: CLIP joint dimension (class embeddings).
        pixel_decoder: ``msdeform`` | ``fpn``; decoder: ``mask2former`` | ``maskformer``.
        class_head: ``text`` | ``objectness`` | ``none`` (class-agnostic proposal networks).
        dim / mask_dim / num_queries / decoder_layers / heads / ffn_dim: decoder sizes (``dim`` is
            Mask2Former's ``HIDDEN_DIM``, the transformer decoder's width).
        conv_dim: the pixel decoder's width (Mask2Former's ``CONVS_DIM``); ``None`` = ``dim`` (both
            256 in Mask2Former). A narrower pixel decoder is cheap: its 3×3 output conv at 1/4
            dominates the stack's cost on small images.
        encoder_layers / encoder_points / encoder_ffn_dim: the deformable encoder.
        temperature: cosine temperature of the text classifier.
    """

    def __init__(
        self,
        backbone_channels: list[int],
        backbone_strides: list[int],
        joint_dim: int,
        pixel_decoder: Literal["msdeform", "fpn"] = "msdeform",
        decoder: Literal["mask2former", "maskformer"] = "mask2former",
        class_head: Literal["text", "objectness", "none"] = "text",
        dim: int = 256,
        mask_dim: int = 256,
        num_queries: int = 100,
        decoder_layers: int = 9,
        heads: int = 8,
        ffn_dim: int = 2048,
        encoder_layers: int = 6,
        encoder_points: int = 4,
        encoder_ffn_dim: int = 1024,
        temperature: float = 0.07,
        conv_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        conv_dim = dim if conv_dim is None else conv_dim
        if pixel_decoder == "msdeform":
            self.pixel_decoder: nn.Module = MSDeformPixelDecoder(
                backbone_channels, backbone_strides, conv_dim, mask_dim, encoder_layers, heads, encoder_points, encoder_ffn_dim
            )
        elif pixel_decoder == "fpn":
            self.pixel_decoder = FPNPixelDecoder(backbone_channels, backbone_strides, conv_dim, mask_dim)
        else:
            raise ValueError(f"method.pixel_decoder={pixel_decoder!r} is not one of ['msdeform', 'fpn']")
        query_heads = QueryHeads(dim, mask_dim, joint_dim, class_head, temperature)
        if decoder == "mask2former":
            self.decoder: nn.Module = Mask2FormerDecoder(query_heads, conv_dim, dim, heads, decoder_layers, ffn_dim, num_queries)
        elif decoder == "maskformer":
            self.decoder = MaskFormerDecoder(query_heads, conv_dim, dim, heads, decoder_layers, ffn_dim, num_queries)
        else:
            raise ValueError(f"method.decoder={decoder!r} is not one of ['mask2former', 'maskformer']")

    def forward(self, features: list[Tensor], class_embeddings: Optional[Tensor] = None) -> list[QueryPrediction]:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features, class_embeddings)
