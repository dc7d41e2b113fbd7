from zeroseg.methods.base import CheckpointMismatchError, ZSSMethod
from zeroseg.methods.baseline import Baseline
from zeroseg.methods.c2s import CLIPToSeg
from zeroseg.methods.chimera import ChimeraSeg
from zeroseg.methods.clip_zero_shot import CLIPZeroShot
from zeroseg.methods.deop import DeOP
from zeroseg.methods.maft import MAFT
from zeroseg.methods.multipass_clip import MultipassCLIP
from zeroseg.methods.query_baseline import QueryBaseline
from zeroseg.methods.split_matching import SplitMatching

__all__ = [
    "Baseline",
    "CLIPToSeg",
    "CLIPZeroShot",
    "CheckpointMismatchError",
    "ChimeraSeg",
    "DeOP",
    "MAFT",
    "MultipassCLIP",
    "QueryBaseline",
    "SplitMatching",
    "ZSSMethod",
]
