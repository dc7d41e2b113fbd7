"""The papers' mmseg data pipelines, for images ``uint8 (H, W, 3)`` and class-id labels ``uint8 (H, W)``.

Training (ZegCLIP / CLIP-to-Seg / Chimera-Seg recipes)::

    RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)
    RandomCrop(512x512, cat_max_ratio=0.75)
    RandomFlip(0.5)
    PhotoMetricDistortion
    Normalize(ImageNet mean/std) ; Pad(512x512, image 0, label ignore)

Test: keep-ratio resize into ``scale`` (2048, 512) — the short side becomes 512 unless the long
side would exceed 2048 — with the label left at its original size (the metric compares at the
original resolution; :mod:`zeroseg.inference` resizes logits back).

Normalisation is not done here: the student backbone and the CLIP teacher each normalise with their
own statistics. mmseg pads *after* normalising, so its padding is 0 in normalised units, i.e. the
mean colour; here images are padded before the models normalise them, so the pad value is that
mean colour in [0, 1] (``pad_value``, default mmseg's ``img_norm_cfg`` mean 123.675, 116.28, 103.53
over 255 = ImageNet's, which the students normalise with: their padding becomes exactly 0 as in
mmseg; the CLIP teacher's own mean differs by less than 0.005).

Images stay uint8 until the end (as mmseg's) and labels are only ever resized by nearest
neighbour. Differences from mmseg's OpenCV arithmetic, all in the image values only:

* resizing uses PIL's bilinear filter, which antialiases when it shrinks (its support widens with
  the scale factor), where ``cv2.resize`` with ``INTER_LINEAR`` samples only the 2x2 nearest pixels:
  shrunk images are smoother than mmseg's (on pixel noise shrunk 4x, up to 108 levels apart, 25 on
  average), enlarged ones agree within one level (measured against OpenCV on uniform random RGB);
* the HSV steps of :class:`PhotoMetricDistortion` use PIL's 8-bit HSV (hue in 256 steps) instead of
  OpenCV's (hue in 180 steps): see its docstring.

Randomness comes from torch's global generator, which Lightning seeds per worker.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zeroseg.data.folders import image_to_tensor

__all__ = [
    "PhotoMetricDistortion",
    "EvalTransform",
    "TrainTransform",
    "keep_ratio_size",
    "random_crop_box",
]


# mmseg's img_norm_cfg mean (123.675, 116.28, 103.53) / 255: ImageNet's, the students' normalisation
MMSEG_MEAN = (0.485, 0.456, 0.406)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with long side ≤ max(scale) and short side
    ≤ min(scale); returns ``(height, width)``."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour only: a label value is never blended into another."""
    if label.shape == size:
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's generator."""
    return int(torch.randint(low, high + 1, (1,)).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def random_crop_box(
    label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float, ignore_index: int, attempts: int = 10
) -> tuple[int, int, int, int]:
    """mmseg RandomCrop's box ``(top, left, height, width)``: retry up to ``attempts`` times until
    the crop holds at least two classes and no class covers ``cat_max_ratio`` or more of its
    labelled pixels; the last draw is kept otherwise. ``cat_max_ratio >= 1`` disables the check."""
    height, width = label.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int, int, int]:
        return _randint(0, height - crop_h), _randint(0, width - crop_w), crop_h, crop_w

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(attempts):
        top, left, h, w = box
        counts = np.bincount(label[top : top + h, left : left + w].ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def _saturate(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: ``clip(x * alpha + beta, 0, 255)`` truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on ``uint8 (H, W, 3)`` RGB images.

    Each step fires with probability 0.5: brightness shift in ±``brightness_delta``; contrast
    factor in ``contrast_range`` (before or after the colour steps, chosen at random); saturation
    factor in ``saturation_range`` and an integer hue shift of ``-hue_delta .. hue_delta - 1``
    OpenCV hue units (of 180) in HSV — mmseg draws it with NumPy's ``randint``, whose upper bound is
    exclusive, so +``hue_delta`` itself never occurs. Values are clipped to 0..255 and truncated to
    uint8 after every step, as mmseg does.

    The HSV round trip is PIL's, not OpenCV's: PIL stores hue in 256 steps (the shift is rescaled by
    256/180 and rounded) and quantises S and V differently. PIL's round trip alone moves a channel
    by up to 7 of 255 levels (OpenCV's by up to 5), and after a saturation or hue change a pixel
    can differ from mmseg's OpenCV result by up to about 15 levels (about 1 on average; measured on
    uniform random RGB). Brightness and contrast are exact.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if _randint(0, 1):
            image = _saturate(image, alpha=_uniform(*self.contrast_range))
        return image

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if _randint(0, 1):
            image = _saturate(image, beta=_uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(_randint(0, 1))
        if contrast_first:
            image = self._contrast(image)
        change_saturation, change_hue = _randint(0, 1), _randint(0, 1)
        if change_saturation or change_hue:
            hsv = np.array(Image.fromarray(np.ascontiguousarray(image)).convert("HSV"))
            if change_saturation:
                hsv[..., 1] = _saturate(hsv[..., 1], alpha=_uniform(*self.saturation_range))
            if change_hue:
                # NumPy's randint excludes its upper bound: mmseg's shifts are -delta .. delta-1
                shift = round(_randint(-self.hue_delta, max(self.hue_delta - 1, -self.hue_delta)) * 256 / 180)
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
            image = np.asarray(Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.tobytes()).convert("RGB"))
        if not contrast_first:
            image = self._contrast(image)
        return image


def _to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
    return image_to_tensor(image), torch.from_numpy(label.astype(np.int64))


class TrainTransform:
    """Training pipeline (see the module docstring); every size and probability is a YAML value.

    Args:
        scale: ``(long, short)`` base scale of the random keep-ratio resize.
        ratio_range: the base scale is multiplied by a factor drawn uniformly from this range.
        crop_size: ``(height, width)`` of the random crop; smaller results are padded to it.
        cat_max_ratio: largest share one class may have of a crop's labelled pixels (1 disables).
        flip_prob: probability of a horizontal flip.
        photometric: apply :class:`PhotoMetricDistortion` (``None`` disables).
        ignore_index: label value of padding.
        pad_value: per-channel image value of padding in [0, 1]: the mean colour the models
            normalise with, so that padding is 0 after normalisation as in mmseg (which pads the
            normalised image with 0).
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        crop_size: int | Sequence[int] = 512,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: Optional[PhotoMetricDistortion] = None,
        ignore_index: int = 255,
        pad_value: Sequence[float] = MMSEG_MEAN,
    ) -> None:
        if len(pad_value) != 3 or not all(0.0 <= float(v) <= 1.0 for v in pad_value):
            raise ValueError(f"transform pad_value={list(pad_value)} must be 3 values in [0, 1] (R, G, B of the padding)")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"transform ratio_range={list(ratio_range)} must be [low, high] with 0 < low <= high")
        self.scale = tuple(int(s) for s in scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.crop_size = _pair(crop_size)  # type: ignore[arg-type]
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.pad_value = tuple(float(v) for v in pad_value)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict[str, Tensor]:
        ratio = _uniform(*self.ratio_range)
        size = keep_ratio_size(*label.shape, [math.floor(s * ratio) for s in self.scale])
        image, label = resize_image(image, size), resize_label(label, size)
        top, left, h, w = random_crop_box(label, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, label = image[top : top + h, left : left + w], label[top : top + h, left : left + w]
        if float(torch.rand(()).item()) < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image)
        image_t, label_t = _to_tensors(image, label)
        pad_h, pad_w = self.crop_size[0] - h, self.crop_size[1] - w
        if pad_h or pad_w:
            padded = torch.tensor(self.pad_value, dtype=image_t.dtype).view(3, 1, 1).repeat(1, *self.crop_size)
            padded[:, :h, :w] = image_t
            image_t = padded
            label_t = torch.nn.functional.pad(label_t, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return {"image": image_t, "label": label_t}


class EvalTransform:
    """Keep-ratio resize of the image into ``scale``; the label keeps its original size.

    Args:
        scale: ``(long, short)`` limits of the resize (mmseg ``Resize(scale, keep_ratio=True)``).
    """

    def __init__(self, scale: Sequence[int] = (2048, 512)) -> None:
        self.scale = tuple(int(s) for s in scale)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict[str, Tensor]:
        image = resize_image(image, keep_ratio_size(*label.shape, self.scale))
        image_t, label_t = _to_tensors(image, label)
        return {"image": image_t, "label": label_t}
