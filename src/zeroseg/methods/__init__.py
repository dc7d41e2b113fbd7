from zeroseg.methods.base import CheckpointMismatchError, ZSSMethod
from zeroseg.methods.baseline import Baseline

__all__ = ["Baseline", "CheckpointMismatchError", "ZSSMethod"]
