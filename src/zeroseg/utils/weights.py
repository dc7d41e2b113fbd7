"""Reading and loading weight files from local disk, with errors that name the file.

One reader for every pretrained file zeroseg accepts (CLIP teachers, backbones): safetensors,
TorchScript archives (OpenAI's released CLIP files), and pickled state dicts, possibly wrapped in
``{"state_dict": ...}`` / ``{"model": ...}`` and prefixed by ``module.`` (DDP).
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["read_weight_file", "load_checked_state_dict"]


def read_weight_file(path: Union[str, os.PathLike], key: str = "pretrained") -> dict[str, Tensor]:
    """The tensors of a weight file as a flat state dict; ``key`` names the config entry in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{key}={str(path)!r}: could not read the weights file ({error})") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{key}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{key}={str(path)!r} holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checked_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], path: str, key: str = "pretrained", require_all: bool = False
) -> None:
    """Load ``state`` into ``module``: shape mismatches and foreign files raise, gaps are reported.

    ``require_all``: every parameter of ``module`` must be in the file (a backbone checkpoint of
    the same architecture); otherwise missing keys are only logged (e.g. a new head).
    """
    expected = module.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if mismatched:
        examples = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:3])
        raise ValueError(f"{key}={path!r}: {len(mismatched)} tensors do not match the model's shapes, e.g. {examples}")
    shared = set(state) & set(expected)
    if not shared:
        raise ValueError(
            f"{key}={path!r} shares no key with the model: a checkpoint of another architecture? "
            f"(file keys e.g. {sorted(state)[:3]}, model keys e.g. {sorted(expected)[:3]})"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing and require_all:
        raise ValueError(
            f"{key}={path!r} lacks {len(missing)} of the model's tensors, e.g. {missing[:5]}: truncated or another variant?"
        )
    module.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        log.warning(
            "%s=%s: %d missing keys %s, %d unexpected keys %s",
            key,
            path,
            len(missing),
            missing[:5],
            len(unexpected),
            unexpected[:5],
        )
    log.info("%s: loaded %d tensors from %s", key, len(shared), path)
