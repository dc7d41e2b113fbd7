"""The mmseg training / test pipelines: resize rule, nearest-only labels, cat_max_ratio crop, padding,
flip, photometric distortion (HSV against colorsys)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from zeroseg.data.transforms import (
    EvalTransform,
    PhotoMetricDistortion,
    TrainTransform,
    keep_ratio_size,
    random_crop_box,
)
from zeroseg.models.backbones import IMAGENET_MEAN, IMAGENET_STD


def _image_and_label(height: int = 90, width: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.full((height, width), 3, dtype=np.uint8)
    label[:, width // 3 :] = 7
    label[height // 2 :, : width // 4] = 200
    label[: height // 5, -width // 5 :] = 255
    return image, label


@pytest.mark.parametrize(
    "size,scale,expected",
    [
        ((375, 500), (2048, 512), (512, 683)),  # a VOC image: short side 512
        ((500, 375), (2048, 512), (683, 512)),
        ((100, 1000), (2048, 512), (205, 2048)),  # long side capped at 2048
        ((480, 640), (1024, 256), (256, 341)),
    ],
)
def test_keep_ratio_size_is_mmsegs_rescale(size, scale, expected) -> None:
    assert keep_ratio_size(*size, scale) == expected


def test_training_labels_are_only_resized_by_nearest_neighbour_and_padding_is_ignore() -> None:
    image, label = _image_and_label()
    torch.manual_seed(0)
    transform = TrainTransform(
        scale=(400, 100), ratio_range=(0.5, 2.0), crop_size=(96, 96), cat_max_ratio=0.75, photometric=PhotoMetricDistortion()
    )
    padded = 0
    for _ in range(40):
        item = transform(image, label)
        assert item["image"].shape == (3, 96, 96) and item["label"].shape == (96, 96)
        assert item["image"].dtype == torch.float32 and 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
        assert set(item["label"].unique().tolist()) <= {3, 7, 200, 255}  # no blended values
        # rows beyond the resized image are padding: image the mean colour, label ignore
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
        rows = (item["label"] == 255).all(dim=1) & (item["image"] == mean.unsqueeze(-1)).all(dim=0).all(dim=1)
        padded += int(rows.any())
    assert padded > 0  # ratio < ~1 makes images smaller than the crop: padding was exercised


def test_small_image_is_padded_like_mmseg_after_normalisation() -> None:
    image, label = _image_and_label(40, 50)
    transform = TrainTransform(scale=(50, 40), ratio_range=(1.0, 1.0), crop_size=64, cat_max_ratio=1.0, flip_prob=0.0)
    item = transform(image, label)
    assert torch.equal(item["label"][:40, :50], torch.from_numpy(label.astype(np.int64)))
    assert bool((item["label"][40:] == 255).all()) and bool((item["label"][:, 50:] == 255).all())
    assert torch.allclose(item["image"][:, :40, :50], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    # mmseg's order, in NumPy: Normalize the uint8 image with img_norm_cfg, then Pad with 0 to 64x64
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    mmseg = np.zeros((64, 64, 3))
    mmseg[:40, :50] = (image - mean) / std
    # what a student sees: our [0, 1] image normalised with ImageNet's statistics (= img_norm_cfg / 255)
    student = (item["image"].numpy().transpose(1, 2, 0) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.abs(student - mmseg).max() < 1e-5


def test_pad_value_must_be_three_values_in_the_unit_range() -> None:
    with pytest.raises(ValueError, match=r"pad_value=\[123.675, 116.28, 103.53\] must be 3 values in \[0, 1\]"):
        TrainTransform(pad_value=(123.675, 116.28, 103.53))


def test_flip_mirrors_image_and_label_together() -> None:
    image, label = _image_and_label(40, 50)
    transform = TrainTransform(scale=(50, 40), ratio_range=(1.0, 1.0), crop_size=(40, 50), cat_max_ratio=1.0, flip_prob=1.0)
    item = transform(image, label)
    assert torch.equal(item["label"], torch.from_numpy(label[:, ::-1].astype(np.int64)))
    assert torch.allclose(item["image"], torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1).float() / 255)


def _reference_crop(label: np.ndarray, crop: int, ratio: float, ignore: int = 255) -> tuple[int, int]:
    """A plain transcription of mmseg RandomCrop's retry loop, same random draws."""
    h, w = label.shape

    def draw():
        return int(torch.randint(0, h - crop + 1, (1,))), int(torch.randint(0, w - crop + 1, (1,)))

    top, left = draw()
    for _ in range(10):
        values, counts = np.unique(label[top : top + crop, left : left + crop], return_counts=True)
        counts = counts[values != ignore]
        if len(counts) > 1 and counts.max() / counts.sum() < ratio:
            break
        top, left = draw()
    return top, left


def test_crop_respects_cat_max_ratio_like_mmseg() -> None:
    label = np.zeros((100, 100), dtype=np.uint8)
    label[40:60, 40:60] = 1  # one small object: most crops are almost all class 0
    label[:10] = 255
    satisfied = 0
    for seed in range(30):
        torch.manual_seed(seed)
        top, left, h, w = random_crop_box(label, (30, 30), 0.75, 255)
        torch.manual_seed(seed)
        assert (top, left) == _reference_crop(label, 30, 0.75)
        values, counts = np.unique(label[top : top + h, left : left + w], return_counts=True)
        counts = counts[values != 255]
        satisfied += int(len(counts) > 1 and counts.max() / counts.sum() < 0.75)
    # a random 30x30 crop satisfies the constraint ~10% of the time; with retries most do
    assert satisfied >= 20


def _photometric_with(draws: list[float], image: np.ndarray) -> np.ndarray:
    """Run PhotoMetricDistortion with scripted random draws (ints via randint, floats via rand)."""
    from unittest import mock

    values = iter(draws)
    with (
        mock.patch("zeroseg.data.transforms._randint", lambda low, high: int(next(values))),
        mock.patch("zeroseg.data.transforms._uniform", lambda low, high: float(next(values))),
    ):
        return PhotoMetricDistortion()(image)


def test_photometric_steps_match_hand_computations() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    # brightness on (+20), contrast last, no saturation/hue, contrast on (x1.3): mmseg clips and truncates
    out = _photometric_with([1, 20.0, 0, 0, 0, 1, 1.3], image)
    bright = np.clip(image.astype(np.float32) + 20, 0, 255).astype(np.uint8)
    assert np.array_equal(out, np.clip(bright.astype(np.float32) * 1.3, 0, 255).astype(np.uint8))
    # saturation x0 only: every pixel becomes grey (r == g == b == its max channel, HSV value)
    grey = _photometric_with([0, 1, 0, 1, 0, 0.0, 0], image)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.abs(grey[..., 0].astype(int) - image.max(axis=-1)).max() <= 1
    # hue +18 OpenCV units = +36 degrees, against colorsys
    shifted = _photometric_with([0, 1, 0, 0, 1, 18, 0], image)
    for y, x in [(0, 0), (2, 3), (4, 5)]:
        h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255.0))
        expected = np.array(colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v)) * 255
        assert np.abs(shifted[y, x] - expected).max() <= 4  # PIL's 8-bit HSV quantisation


def test_photometric_distortion_changes_colours_and_keeps_uint8() -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    torch.manual_seed(0)
    outputs = [PhotoMetricDistortion()(image) for _ in range(10)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 8  # each of 4 steps fires with p=0.5


def test_eval_transform_resizes_the_image_only() -> None:
    image, label = _image_and_label(375, 500)
    item = EvalTransform(scale=(2048, 512))(image, label)
    assert item["image"].shape == (3, 512, 683)
    assert torch.equal(item["label"], torch.from_numpy(label.astype(np.int64)))


def test_hue_shifts_cover_mmsegs_range_only() -> None:
    """mmseg draws the hue shift with NumPy's randint(-18, 18), which never returns +18."""
    from unittest import mock

    from zeroseg.data import transforms

    real_randint = transforms._randint
    hue_shifts: list[int] = []

    def recording(low: int, high: int) -> int:
        value = real_randint(low, high)
        if low < 0:  # the only signed draw of the distortion is the hue shift
            hue_shifts.append(value)
        return value

    image = np.random.default_rng(2).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    torch.manual_seed(0)
    with mock.patch.object(transforms, "_randint", recording):
        for _ in range(800):
            PhotoMetricDistortion()(image)
    reference = np.unique(np.random.default_rng(0).integers(-18, 18, 20000))  # NumPy's exclusive upper bound
    assert sorted(set(hue_shifts)) == reference.tolist() == list(range(-18, 18))
