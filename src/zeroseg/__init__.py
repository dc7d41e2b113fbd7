"""zeroseg: a PyTorch Lightning + Hydra framework for zero-shot semantic segmentation."""

import os
from importlib.resources import files

from omegaconf import OmegaConf

__version__ = "0.1.0"


def asset_path(name: str) -> str:
    """Path of a file shipped in ``zeroseg/assets`` (e.g. the toy CLIP weights)."""
    return str(files("zeroseg") / "assets" / name)


# `${cwd:}` in configs: the directory the command was started from. Unlike ${hydra:runtime.cwd}
# it also resolves while Hydra builds multirun sweep directories.
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)
# `${asset:toy_clip.safetensors}`: a file shipped inside the package
OmegaConf.register_new_resolver("asset", asset_path, replace=True)
