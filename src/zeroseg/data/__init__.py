from zeroseg.data.benchmarks import BENCHMARKS, benchmark_split
from zeroseg.data.datamodule import TrainingLabels, ZSSDataModule, collate_segmentation
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
