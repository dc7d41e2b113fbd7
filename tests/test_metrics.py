"""HarmonicIoU against torchmetrics' MulticlassJaccardIndex, a NumPy brute force and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from zeroseg.metrics import HarmonicIoU


def brute_force_iou(preds: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    iou = np.full(num_classes, np.nan)
    valid = target != ignore
    for c in range(num_classes):
        tp = np.sum((preds == c) & (target == c) & valid)
        fp = np.sum((preds == c) & (target != c) & valid)
        fn = np.sum((preds != c) & (target == c) & valid)
        if tp + fp + fn > 0:
            iou[c] = tp / (tp + fp + fn)
    return iou * 100


def random_batch(generator: torch.Generator, num_classes: int, absent: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    present = torch.tensor([c for c in range(num_classes) if c not in absent])
    target = present[torch.randint(len(present), (3, 17, 13), generator=generator)]
    preds = present[torch.randint(len(present), (3, 17, 13), generator=generator)]
    # make predictions right most of the time so IoUs are not all tiny
    keep = torch.rand(target.shape, generator=generator) < 0.6
    preds = torch.where(keep, target, preds)
    target[torch.rand(target.shape, generator=generator) < 0.1] = 255
    return preds, target


def test_matches_torchmetrics_and_brute_force_with_ignore_and_absent_classes() -> None:
    num_classes, unseen, absent = 7, [1, 5, 6], {4, 6}
    metric = HarmonicIoU(num_classes, unseen)
    reference = MulticlassJaccardIndex(num_classes, average="none", ignore_index=255)
    generator = torch.Generator().manual_seed(0)
    all_preds, all_targets = [], []
    for _ in range(4):
        preds, target = random_batch(generator, num_classes, absent)
        metric.update(preds, target)
        reference.update(preds, target)
        all_preds.append(preds.numpy())
        all_targets.append(target.numpy())
    result = metric.compute()
    ours = result["per_class_iou"].numpy()
    brute = brute_force_iou(np.concatenate(all_preds), np.concatenate(all_targets), num_classes, 255)
    np.testing.assert_allclose(ours, brute, rtol=1e-10, equal_nan=True)
    theirs = reference.compute().double().numpy() * 100
    present = ~np.isnan(ours)
    assert set(np.flatnonzero(~present)) == absent
    np.testing.assert_allclose(ours[present], theirs[present], rtol=1e-5)

    seen_mean = np.nanmean(brute[[0, 2, 3, 4]])
    unseen_mean = np.nanmean(brute[unseen])
    assert float(result["sIoU"]) == pytest.approx(seen_mean)
    assert float(result["uIoU"]) == pytest.approx(unseen_mean)
    assert float(result["hIoU"]) == pytest.approx(2 * seen_mean * unseen_mean / (seen_mean + unseen_mean))
    assert float(result["mIoU"]) == pytest.approx(np.nanmean(brute))
    targets = np.concatenate(all_targets)
    valid = targets != 255
    assert float(result["pAcc"]) == pytest.approx(100 * np.mean(np.concatenate(all_preds)[valid] == targets[valid]))


def test_hand_computed_values_and_logits_input() -> None:
    # 3 classes, class 2 unseen. Valid pixels: targets [0,0,1,2], preds [0,1,1,0]
    target = torch.tensor([[[0, 0], [1, 2]], [[255, 255], [255, 255]]])
    preds = torch.tensor([[[0, 1], [1, 0]], [[2, 2], [2, 2]]])
    metric = HarmonicIoU(3, [2])
    metric.update(torch.nn.functional.one_hot(preds, 3).permute(0, 3, 1, 2).float(), target)
    result = metric.compute()
    # IoU0 = 1/(1+1+1)=1/3, IoU1 = 1/(1+1+0)=1/2, IoU2 = 0/(0+0+1)=0
    np.testing.assert_allclose(result["per_class_iou"].numpy(), [100 / 3, 50.0, 0.0])
    assert float(result["sIoU"]) == pytest.approx((100 / 3 + 50) / 2)
    assert float(result["uIoU"]) == 0.0
    assert float(result["hIoU"]) == 0.0
    assert float(result["pAcc"]) == pytest.approx(50.0)


def test_no_unseen_classes_gives_nan_harmonic() -> None:
    metric = HarmonicIoU(2, [])
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    result = metric.compute()
    assert float(result["mIoU"]) == 100.0
    assert math.isnan(float(result["uIoU"])) and math.isnan(float(result["hIoU"]))


def test_bad_inputs_raise_with_the_values() -> None:
    metric = HarmonicIoU(3, [2])
    with pytest.raises(ValueError, match=r"target contains class ids \[7\]"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[7, 1]]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        metric.update(torch.zeros(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unseen_classes"):
        HarmonicIoU(3, [3])
    with pytest.raises(ValueError, match="ignore_index"):
        HarmonicIoU(3, [], ignore_index=1)
