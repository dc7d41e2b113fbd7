"""Backbones with one interface: images in ``[0, 1]`` → a list of NCHW feature maps.

Every backbone exposes ``channels`` and ``strides`` (one entry per returned map, finest first)
and normalises its input with its own statistics, so heads and pixel decoders never special-case
a family. :class:`TimmBackbone` wraps any timm model that supports ``features_only``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import timm
import torch
from torch import Tensor, nn

from zeroseg.utils.weights import load_checked_state_dict, read_weight_file

log = logging.getLogger(__name__)

__all__ = ["Backbone", "TimmBackbone", "TimmViTBackbone"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class: subclasses set ``channels`` / ``strides`` and implement ``forward_features``.

    ``head_width`` is the decode-head width recommended with this backbone (SegFormer: 256 for
    MiT-B0/B1, 768 for B2–B5); method configs read it as ``${backbone.head_width}``.
    """

    channels: list[int]
    strides: list[int]

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, head_width: Optional[int] = None
    ) -> None:
        super().__init__()
        self.head_width = head_width
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → feature maps, finest first."""
        return self.forward_features((images - self.pixel_mean) / self.pixel_std)


class TimmBackbone(Backbone):
    """A timm model in ``features_only`` mode.

    Args:
        model_name: timm model name (``resnet18``, ``resnet50``, …).
        out_indices: which feature levels to return (timm's numbering).
        pretrained: local weights file (timm/torchvision layout) or ``None`` for random init.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained: Optional[str] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        head_width: Optional[int] = None,
        **model_kwargs,
    ) -> None:
        super().__init__(mean, std, head_width)
        if model_name not in timm.list_models():
            raise ValueError(f"backbone.model_name={model_name!r} is not a timm model")
        self.model_name = model_name
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **model_kwargs
        )
        if pretrained:
            # features_only models keep the parameter names of the full model; its classifier
            # (fc.*, head.*) is reported as unexpected and skipped
            state = read_weight_file(pretrained, key="backbone.pretrained")
            load_checked_state_dict(self.body, state, pretrained, key="backbone.pretrained", require_all=True)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    def forward_features(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))


class TimmViTBackbone(Backbone):
    """A timm Vision Transformer returning the patch tokens of several blocks as NCHW maps.

    All maps have the patch stride (16 for ViT-B/16); position embeddings are resampled to any
    input size (``dynamic_img_size``). ``pretrained`` accepts timm ViT checkpoints and CLIP
    visual towers (OpenAI or open_clip layout, converted by timm's ViT checkpoint filter); CLIP
    weights need the CLIP variant of the architecture
    (``model_name=vit_base_patch16_clip_quickgelu_224`` for OpenAI's ViT-B/16).

    Args:
        model_name: timm ViT name.
        out_indices: blocks whose outputs are returned (0-based; ViT-B: 12 blocks).
        pretrained: local weights file or ``None``.
        drop_path_rate: stochastic depth.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        out_indices: Sequence[int] = (3, 5, 7, 11),
        pretrained: Optional[str] = None,
        drop_path_rate: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        head_width: Optional[int] = None,
    ) -> None:
        super().__init__(mean, std, head_width)
        if model_name not in timm.list_models("vit_*"):
            raise ValueError(f"backbone.model_name={model_name!r} is not a timm Vision Transformer")
        self.body = timm.create_model(
            model_name, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate
        )
        depth = len(self.body.blocks)
        if not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"backbone.out_indices={list(out_indices)} must lie in 0..{depth - 1}")
        self.out_indices = list(out_indices)
        if pretrained:
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(read_weight_file(pretrained, key="backbone.pretrained"), self.body)
            load_checked_state_dict(self.body, state, pretrained, key="backbone.pretrained", require_all=True)
        # blocks after the last returned one, the final norm and the head never run: drop them
        self.body.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        patch = self.body.patch_embed.patch_size[0]
        self.channels = [self.body.embed_dim] * len(self.out_indices)
        self.strides = [patch] * len(self.out_indices)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        return list(self.body.forward_intermediates(images, indices=self.out_indices, output_fmt="NCHW", intermediates_only=True))
