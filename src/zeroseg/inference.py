"""Dense inference shared by every method: whole image or sliding window, then resize to the label.

``SegmentationInference`` wraps a method's ``predict(images) -> logits (B, C, h, w)`` (any output
resolution). Sliding-window mode follows mmseg's ``slide_inference`` (as ZegCLIP evaluates): windows
of ``crop_size`` every ``stride`` pixels, the last window of a row/column flush with the image
border, window logits resized to the window and summed into the image, divided by the number of
windows covering each pixel. An image smaller than a window in some dimension gets windows of its
own size there. All windows of a batch are predicted in chunks of ``windows_per_batch``.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentationInference", "window_boxes", "resize_logits"]

Predict = Callable[[Tensor], Tensor]
Mode = Literal["whole", "slide"]


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` logits to ``size`` (no-op when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _starts(length: int, crop: int, stride: int) -> list[int]:
    crop = min(crop, length)
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


def window_boxes(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Windows ``(top, left, height, width)`` covering an image, mmseg's grid."""
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    return [
        (top, left, crop_h, crop_w)
        for top in _starts(height, crop_size[0], stride[0])
        for left in _starts(width, crop_size[1], stride[1])
    ]


class SegmentationInference:
    """How a method turns images into logits over all classes at evaluation.

    Args:
        mode: ``whole`` (one forward per image) or ``slide`` (sliding windows).
        crop_size: window ``(height, width)`` (or one int) in slide mode.
        stride: window step ``(height, width)`` (or one int) in slide mode.
        windows_per_batch: windows predicted together in slide mode (memory bound).
    """

    def __init__(
        self,
        mode: Mode = "whole",
        crop_size: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 426,
        windows_per_batch: int = 16,
    ) -> None:
        if mode not in ("whole", "slide"):
            raise ValueError(f"inference.mode={mode!r} is not one of ['whole', 'slide']")
        self.mode = mode
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
        if min(self.stride) < 1 or any(s > c for s, c in zip(self.stride, self.crop_size)):
            raise ValueError(
                f"inference.stride={list(self.stride)} must be between 1 and inference.crop_size={list(self.crop_size)} "
                "(a larger stride leaves pixels without any window)"
            )
        if windows_per_batch < 1:
            raise ValueError(f"inference.windows_per_batch={windows_per_batch} must be >= 1")
        self.windows_per_batch = windows_per_batch

    def __call__(self, predict: Predict, images: Tensor) -> Tensor:
        """Logits ``(B, C, H, W)`` at the resolution of ``images`` ``(B, 3, H, W)``."""
        if self.mode == "whole":
            return resize_logits(predict(images), images.shape[-2:])
        return self.slide(predict, images)

    def slide(self, predict: Predict, images: Tensor) -> Tensor:
        batch, _, height, width = images.shape
        boxes = window_boxes(height, width, self.crop_size, self.stride)
        crops = torch.stack([images[:, :, top : top + h, left : left + w] for top, left, h, w in boxes], dim=1)  # (B, N, 3, h, w)
        crops = crops.flatten(0, 1)
        window_h, window_w = boxes[0][2], boxes[0][3]
        summed: Tensor | None = None
        count = torch.zeros(1, 1, height, width, device=images.device)
        for top, left, h, w in boxes:
            count[:, :, top : top + h, left : left + w] += 1
        # accumulate chunk by chunk: the logits of all windows at once can exceed memory (171 classes)
        for start in range(0, len(crops), self.windows_per_batch):
            logits = resize_logits(predict(crops[start : start + self.windows_per_batch]), (window_h, window_w))
            if summed is None:
                summed = logits.new_zeros(batch, logits.shape[1], height, width, dtype=torch.float32)
            for offset, window in enumerate(logits):
                b, n = divmod(start + offset, len(boxes))
                top, left, h, w = boxes[n]
                summed[b, :, top : top + h, left : left + w] += window.float()
        assert summed is not None
        return summed / count

    def __repr__(self) -> str:
        if self.mode == "whole":
            return "SegmentationInference(mode='whole')"
        return f"SegmentationInference(mode='slide', crop_size={list(self.crop_size)}, stride={list(self.stride)})"
