"""zeroseg: a PyTorch Lightning + Hydra framework for zero-shot semantic segmentation."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${cwd:}` in configs: the directory the command was started from. Unlike ${hydra:runtime.cwd}
# it also resolves while Hydra builds multirun sweep directories.
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)
