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


def _run_dir(base: str, kind: str = "run", *, _root_: object) -> str:
    # imported when a run directory is named (the CLI), so `import zeroseg` stays light
    from zeroseg.utils.run_dirs import run_dir_resolver

    return run_dir_resolver(base, kind, _root_=_root_)  # type: ignore[arg-type]


# `${run_dir:<base>}`: a new run directory no other launch shares, or the one resume=auto continues
OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


def _sweep_dir(base: str) -> str:
    from zeroseg.utils.run_dirs import new_run_dir

    return str(new_run_dir(base))


# `${sweep_dir:<base>}`: a new multirun directory. Cached: Hydra hands the submitting process's resolver
# cache to every job, so jobs a launcher starts in fresh processes (submitit) write into the same sweep
OmegaConf.register_new_resolver("sweep_dir", _sweep_dir, replace=True, use_cache=True)
