from zeroseg.metrics.harmonic_iou import (
    SUMMARY_KEYS,
    HarmonicIoU,
    confusion_matrix,
    iou_from_confusion,
    summarize_confusion,
)

__all__ = ["SUMMARY_KEYS", "HarmonicIoU", "confusion_matrix", "iou_from_confusion", "summarize_confusion"]
