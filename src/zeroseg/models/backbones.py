"""Backbones with one interface: images in ``[0, 1]`` → a list of NCHW feature maps.

Every backbone exposes ``channels`` and ``strides`` (one entry per returned map, finest first)
and normalises its input with its own statistics, so heads and pixel decoders never special-case
a family. :class:`TimmBackbone` wraps any timm model that supports ``features_only``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["Backbone", "TimmBackbone", "load_backbone_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class: subclasses set ``channels`` / ``strides`` and implement ``forward_features``."""

    channels: list[int]
    strides: list[int]

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> list[Tensor]:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → feature maps, finest first."""
        return self.forward_features((images - self.pixel_mean) / self.pixel_std)


def load_backbone_weights(module: nn.Module, path: str, strict: bool = False) -> None:
    """Load a local checkpoint into ``module``, reporting missing/unexpected keys.

    Shape mismatches always raise, naming the file and the first offending keys.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"backbone weights file {path!r} does not exist (backbone.pretrained)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"could not read backbone weights {path!r}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    expected = module.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"backbone weights {path!r}: shapes do not match the model for {len(mismatched)} keys, e.g. "
            + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:3])
        )
    result = module.load_state_dict(state, strict=strict)
    if result.missing_keys or result.unexpected_keys:
        log.warning(
            "backbone weights %s: %d missing keys %s, %d unexpected keys %s",
            path,
            len(result.missing_keys),
            result.missing_keys[:5],
            len(result.unexpected_keys),
            result.unexpected_keys[:5],
        )
    if not set(state) & set(expected):
        raise ValueError(f"backbone weights {path!r} share no key with the model: a checkpoint of another architecture?")


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
        **model_kwargs,
    ) -> None:
        super().__init__(mean, std)
        if model_name not in timm.list_models():
            raise ValueError(f"backbone.model_name={model_name!r} is not a timm model")
        self.model_name = model_name
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **model_kwargs
        )
        if pretrained:
            # features_only models keep the classifier-free parameter names of the full model
            load_backbone_weights(self.body, pretrained)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    def forward_features(self, images: Tensor) -> list[Tensor]:
        return list(self.body(images))
