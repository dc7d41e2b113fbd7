from zeroseg.methods.base import CheckpointMismatchError, ZSSMethod
from zeroseg.methods.baseline import Baseline
from zeroseg.methods.c2s import CLIPToSeg
from zeroseg.methods.chimera import ChimeraSeg
from zeroseg.methods.clip_zero_shot import CLIPZeroShot
from zeroseg.methods.query_baseline import QueryBaseline
from zeroseg.methods.split_matching import SplitMatching

__all__ = ["Baseline", "CLIPToSeg", "CLIPZeroShot", "CheckpointMismatchError", "ChimeraSeg", "QueryBaseline", "SplitMatching", "ZSSMethod"]
