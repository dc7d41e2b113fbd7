"""Sliding-window inference: mmseg's window grid, equality with whole-image inference for a
translation-equivariant model, chunking, and the methods' variable-size evaluation path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zeroseg.data import collate_segmentation
from zeroseg.inference import SegmentationInference, window_boxes


def test_window_grid_matches_mmseg_slide_inference() -> None:
    # 512x683 (a VOC image at short side 512), crop 512 stride 426: two windows, the last flush right
    assert window_boxes(512, 683, (512, 512), (426, 426)) == [(0, 0, 512, 512), (0, 171, 512, 512)]
    boxes = window_boxes(700, 1300, (512, 512), (426, 426))
    assert [b[:2] for b in boxes] == [(0, 0), (0, 426), (0, 788), (188, 0), (188, 426), (188, 788)]
    assert window_boxes(300, 400, (512, 512), (426, 426)) == [(0, 0, 300, 400)]  # smaller than a window
    covered = torch.zeros(700, 1300)
    for top, left, h, w in boxes:
        covered[top : top + h, left : left + w] = 1
    assert bool(covered.all())


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (20, 90)])
@pytest.mark.parametrize("windows_per_batch", [1, 3, 100])
def test_slide_equals_whole_for_a_translation_equivariant_model(size, windows_per_batch) -> None:
    torch.manual_seed(0)
    pointwise = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 5, 1))  # per-pixel: equivariant
    images = torch.rand(2, 3, *size)
    whole = SegmentationInference("whole")(pointwise, images)
    slide = SegmentationInference("slide", crop_size=24, stride=16, windows_per_batch=windows_per_batch)(pointwise, images)
    assert slide.shape == (2, 5, *size)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_averages_overlapping_windows() -> None:
    # a model whose logit is the window's mean intensity: overlaps average the two windows' values
    def window_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, 2, 2)

    image = torch.zeros(1, 3, 8, 12)
    image[..., 6:] = 1.0
    logits = SegmentationInference("slide", crop_size=8, stride=4)(window_mean, image)
    # windows at x=0 (mean 2/8) and x=4 (mean 6/8); columns 4-7 are covered by both
    assert logits[0, 0, 0, 0] == pytest.approx(0.25)
    assert logits[0, 0, 0, 5] == pytest.approx(0.5)
    assert logits[0, 0, 0, 11] == pytest.approx(0.75)


def test_bad_inference_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="inference.mode='tiles'"):
        SegmentationInference("tiles")
    with pytest.raises(ValueError, match=r"inference.stride=\[600, 600\] must be between 1 and inference.crop_size"):
        SegmentationInference("slide", crop_size=512, stride=600)


def test_collate_keeps_images_of_different_sizes_as_lists() -> None:
    same = [{"image": torch.zeros(3, 4, 5), "label": torch.zeros(4, 5, dtype=torch.long)} for _ in range(2)]
    assert collate_segmentation(same)["image"].shape == (2, 3, 4, 5)
    mixed = same + [{"image": torch.zeros(3, 6, 5), "label": torch.zeros(9, 7, dtype=torch.long)}]
    batch = collate_segmentation(mixed)
    assert isinstance(batch["image"], list) and [t.shape[-2:] for t in batch["label"]] == [(4, 5), (4, 5), (9, 7)]
