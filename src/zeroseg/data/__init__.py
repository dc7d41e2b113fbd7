from zeroseg.data.datamodule import TrainingLabels, ZSSDataModule
from zeroseg.data.samplers import ResumableDataLoader, ResumableTrainSampler, ShardedEvalSampler
from zeroseg.data.splits import SETTINGS, ClassSplit
from zeroseg.data.synthetic import SyntheticScenes

__all__ = [
    "ClassSplit",
    "ResumableDataLoader",
    "ResumableTrainSampler",
    "SETTINGS",
    "ShardedEvalSampler",
    "SyntheticScenes",
    "TrainingLabels",
    "ZSSDataModule",
]
