"""zeroseg's data layer. The datamodule (which imports Lightning) loads on first use, so the data tools
(``python -m zeroseg.data.prepare``, ``zeroseg.data.verify``) start without Lightning."""

from typing import Any

from zeroseg.data.benchmarks import BENCHMARKS, benchmark_split
from zeroseg.data.folders import (
    ADE20KSegmentation,
    COCOStuffSegmentation,
    DatasetLayoutError,
    LabelValueError,
    PascalContext,
    SegmentationFolder,
    VOCSegmentation,
)
from zeroseg.data.samplers import ResumableDataLoader, ResumableTrainSampler, ShardedEvalSampler
from zeroseg.data.splits import SETTINGS, ClassSplit
from zeroseg.data.transforms import EvalTransform, PhotoMetricDistortion, TrainTransform

__all__ = [
    "ADE20KSegmentation",
    "BENCHMARKS",
    "COCOStuffSegmentation",
    "ClassSplit",
    "DatasetLayoutError",
    "LabelValueError",
    "PascalContext",
    "PhotoMetricDistortion",
    "ResumableDataLoader",
    "ResumableTrainSampler",
    "SETTINGS",
    "SegmentationFolder",
    "ShardedEvalSampler",
    "EvalTransform",
    "TrainTransform",
    "TrainingLabels",
    "VOCSegmentation",
    "ZSSDataModule",
    "benchmark_split",
    "collate_segmentation",
]

# names served by a module that imports Lightning: imported when first used
_LAZY = {name: "zeroseg.data.datamodule" for name in ("TrainingLabels", "ZSSDataModule", "collate_segmentation")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zeroseg.data' has no attribute {name!r}")
