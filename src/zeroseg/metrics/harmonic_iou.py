"""Generalized zero-shot segmentation metric: seen / unseen / harmonic IoU.

Protocol (SPNet, ZegFormer, ZegCLIP; see docs/protocol.md): every test pixel is classified over
ALL classes; IoUs are computed from one confusion matrix accumulated over the whole dataset,
sIoU is the mean over seen classes, uIoU the mean over unseen classes and
hIoU = 2·sIoU·uIoU / (sIoU + uIoU). A class absent from both prediction and ground truth over the
whole dataset has no IoU (NaN) and does not enter any mean.

This is the benchmark (dataset-level) mIoU; ``torchmetrics.segmentation.MeanIoU`` averages per
image and is a different number.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["HarmonicIoU", "SUMMARY_KEYS", "confusion_matrix", "iou_from_confusion", "summarize_confusion"]

# the scalar results, in the order tables print them
SUMMARY_KEYS: tuple[str, ...] = ("hIoU", "sIoU", "uIoU", "mIoU", "pAcc")


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Confusion matrix ``M[true, pred]`` (int64, ``num_classes``²) of the non-ignored pixels.

    Raises ``ValueError`` naming the offending values when a target is neither a class id nor
    ``ignore_index``, or a prediction is out of range: nothing is silently dropped.
    """
    target = target.reshape(-1)
    preds = preds.reshape(-1)
    valid = target != ignore_index
    target = target[valid].long()
    preds = preds[valid].long()
    if target.numel():
        bad_target = (target < 0) | (target >= num_classes)
        if bool(bad_target.any()):
            values = torch.unique(target[bad_target])[:10].tolist()
            raise ValueError(
                f"HarmonicIoU: target contains class ids {values}, expected 0..{num_classes - 1} or ignore_index={ignore_index}"
            )
        bad_pred = (preds < 0) | (preds >= num_classes)
        if bool(bad_pred.any()):
            values = torch.unique(preds[bad_pred])[:10].tolist()
            raise ValueError(f"HarmonicIoU: predictions contain class ids {values}, expected 0..{num_classes - 1}")
    flat = target * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confmat: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN where the class is absent from both."""
    confmat = confmat.double()
    true_positive = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


def _nanmean(values: Tensor) -> Tensor:
    present = values[~values.isnan()]
    return present.mean() if present.numel() else values.new_tensor(float("nan"))


def summarize_confusion(confmat: Tensor, unseen_classes: Sequence[int]) -> dict[str, Tensor]:
    """All summary numbers of a confusion matrix, in percent.

    Returns ``hIoU``, ``sIoU``, ``uIoU``, ``mIoU``, ``pAcc`` (0-d float64 tensors) and
    ``per_class_iou`` (one value per class, NaN for absent classes). With no unseen classes
    (e.g. cross-dataset evaluation) ``uIoU`` and ``hIoU`` are NaN.
    """
    num_classes = confmat.shape[0]
    iou = iou_from_confusion(confmat) * 100.0
    is_unseen = torch.zeros(num_classes, dtype=torch.bool, device=confmat.device)
    is_unseen[list(unseen_classes)] = True
    seen_iou = _nanmean(iou[~is_unseen])
    unseen_iou = _nanmean(iou[is_unseen])
    denominator = seen_iou + unseen_iou
    harmonic = torch.where(denominator > 0, 2 * seen_iou * unseen_iou / denominator, torch.zeros_like(denominator))
    harmonic = torch.where(denominator.isnan(), denominator, harmonic)
    total = confmat.sum()
    pixel_accuracy = confmat.diag().sum().double() / total.clamp_min(1) * 100.0
    if total == 0:
        pixel_accuracy = pixel_accuracy.new_tensor(float("nan"))
    return {
        "hIoU": harmonic,
        "sIoU": seen_iou,
        "uIoU": unseen_iou,
        "mIoU": _nanmean(iou),
        "pAcc": pixel_accuracy,
        "per_class_iou": iou,
    }


class HarmonicIoU(Metric):
    """Seen / unseen / harmonic mIoU over a dataset-level confusion matrix.

    Args:
        num_classes: number of classes predicted at test time (all classes, seen and unseen).
        unseen_classes: ids of the unseen classes (may be empty for cross-dataset evaluation).
        ignore_index: target value excluded from the metric.

    ``update(preds, target)``: ``preds`` is a class-index map ``(N, H, W)`` or logits
    ``(N, C, H, W)`` (arg-maxed over ``C``); ``target`` is ``(N, H, W)`` with class ids or
    ``ignore_index``. Spatial sizes must match (resize logits to the label size first).

    ``compute()`` returns a dict with ``hIoU``, ``sIoU``, ``uIoU``, ``mIoU``, ``pAcc`` (percent)
    and ``per_class_iou`` (percent, NaN for a class absent from prediction and ground truth).

    Under DDP the confusion matrix is summed over processes, so the result equals the
    single-process one provided every image is evaluated exactly once.

    Example:
        >>> metric = HarmonicIoU(num_classes=3, unseen_classes=[2])
        >>> metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 2, 255]]))
        >>> float(metric.compute()["hIoU"])
        100.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, unseen_classes: Sequence[int] = (), ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"HarmonicIoU: num_classes must be >= 1, got {num_classes}")
        unseen = sorted({int(c) for c in unseen_classes})
        if unseen and (unseen[0] < 0 or unseen[-1] >= num_classes):
            raise ValueError(f"HarmonicIoU: unseen_classes {unseen} must lie in 0..{num_classes - 1}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"HarmonicIoU: ignore_index={ignore_index} collides with a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.unseen_classes = unseen
        self.ignore_index = ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point():
            if preds.dim() != target.dim() + 1 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"HarmonicIoU: logits of shape {tuple(preds.shape)} do not match target {tuple(target.shape)} "
                    f"with {self.num_classes} classes; expected (N, {self.num_classes}, H, W)"
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(
                f"HarmonicIoU: prediction shape {tuple(preds.shape)} != target shape {tuple(target.shape)}; "
                "resize logits to the label size before the metric"
            )
        self.confmat += confusion_matrix(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        return summarize_confusion(self.confmat, self.unseen_classes)
