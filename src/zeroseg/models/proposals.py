"""A frozen query model loaded from an earlier run: the mask proposals of two-stage methods.

DeOP (stream 1), MAFT (stage 1, with its seen-class scores A^p), ``multipass_clip`` and C2S's
"Mask Proposal" pseudo masks all take the proposals of a query model trained before
(``method=query_baseline`` or any method whose model is a backbone + :class:`QuerySegmenter`), given
as ``method.proposals.ckpt_path=<run>/checkpoints/last.ckpt``. :func:`load_proposal_model` rebuilds
that model's backbone and segmenter with the sizes of its own run and loads its weights:

* the sizes come from the checkpoint (``zeroseg.model_config``, written by every run since the
  build records it) or, for older checkpoints, from the run's ``config.yaml`` two folders up;
* a checkpoint of another architecture (no ``segmenter.`` tensors, e.g. a per-pixel ``baseline``)
  stops with an error naming the method that wrote it, the model expected and the command that
  produces one (``produced_by``).

The model is frozen and stays in eval mode (Lightning's ``train()`` cannot switch it back), so its
batch norms keep their running statistics and the method using it never updates it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import hydra
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from zeroseg.models.query_decoders import QueryPrediction
from zeroseg.models.query_segmenter import QuerySegmenter

log = logging.getLogger(__name__)

__all__ = ["ProposalModel", "load_proposal_model", "read_model_config"]

BACKBONE_PREFIX = "backbone."
SEGMENTER_PREFIX = "segmenter."


class ProposalModel(nn.Module):
    """A frozen backbone + :class:`QuerySegmenter` giving every decoder prediction for images in ``[0, 1]``.

    Args:
        backbone: the run's backbone (weights loaded by :func:`load_proposal_model`).
        segmenter: the run's query segmenter.
        joint_dim: the CLIP joint dimension of the run's text classifier.
        input_scale: the run's ``method.input_scale`` (images are resized by it before the backbone).
        source: where the weights came from (for messages).
    """

    def __init__(
        self, backbone: nn.Module, segmenter: QuerySegmenter, joint_dim: int, input_scale: float = 1.0, source: str = ""
    ) -> None:
        super().__init__()
        self._joint_dim = int(joint_dim)
        self.backbone = backbone
        self.segmenter = segmenter
        self.input_scale = float(input_scale)
        self.source = source
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ProposalModel":
        # frozen: a parent's model.train() must not switch batch norms to batch statistics
        return super().train(False)

    @property
    def num_queries(self) -> int:
        return int(self.segmenter.decoder.num_queries)

    @property
    def class_head(self) -> str:
        return str(self.segmenter.decoder.heads.class_head)

    @property
    def joint_dim(self) -> int:
        return int(self._joint_dim)

    @torch.no_grad()
    def forward(self, images: Tensor, class_embeddings: Optional[Tensor] = None) -> list[QueryPrediction]:
        """Every decoder prediction (the last is final) for ``images (B, 3, H, W)``: mask logits at 1/4 of
        the images after ``input_scale``; class logits against ``class_embeddings`` for a text head (without
        them, only the no-object column), ``None`` for ``class_head=none``."""
        if self.input_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        if class_embeddings is None and self.class_head == "text":
            class_embeddings = images.new_zeros(0, self._joint_dim)
        return self.segmenter(self.backbone(images), class_embeddings)


def read_model_config(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The ``backbone`` and ``method`` configs of the run that wrote ``checkpoint`` (from the checkpoint,
    else from ``<run>/config.yaml`` for a checkpoint at ``<run>/checkpoints/<name>.ckpt``)."""
    recorded = dict(checkpoint.get("zeroseg", {}).get("model_config") or {})
    if recorded.get("backbone") is not None and recorded.get("method") is not None:
        return recorded
    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ValueError(
            f"{path}: the checkpoint does not record its model sizes and {run_config} (its run's config) does not exist; "
            "keep the checkpoint inside its run directory (<run>/checkpoints/) or retrain with this version"
        )
    cfg = OmegaConf.load(run_config)
    for group in ("backbone", "method"):
        if cfg.get(group) is None:
            raise ValueError(f"{run_config}: no '{group}' section; it is not the config of a zeroseg training run")
    return {group: _container(cfg, group) for group in ("backbone", "method")}


def _container(cfg: Any, group: str) -> dict[str, Any]:
    """``cfg[group]`` as a dict, interpolations resolved where they can be (the sizes never need more)."""
    try:
        return OmegaConf.to_container(cfg[group], resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - e.g. ${trainer.max_steps} of a partial config; sizes are plain values
        return OmegaConf.to_container(cfg[group], resolve=False)  # type: ignore[return-value]


def load_proposal_model(
    ckpt_path: Optional[str],
    key: str = "method.proposals.ckpt_path",
    produced_by: str = "python -m zeroseg.train method=query_baseline",
) -> ProposalModel:
    """Rebuild and load the frozen query model of the run that wrote ``ckpt_path``.

    Args:
        ckpt_path: a zeroseg checkpoint of a query model (``<run>/checkpoints/last.ckpt``).
        key: the config key that gave the path (named in errors).
        produced_by: the command that trains such a checkpoint (named in errors).
    """
    from zeroseg.build import read_checkpoint  # the build imports the methods, which import this module

    if not ckpt_path:
        raise ValueError(f"{key} is not set: give the checkpoint of a trained query model (it comes from `{produced_by}`)")
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={ckpt_path!r}: no such checkpoint file (it comes from `{produced_by}`)")
    checkpoint = read_checkpoint(path, key)
    info = checkpoint["zeroseg"]
    state = checkpoint["state_dict"]
    segmenter_state = {k[len(SEGMENTER_PREFIX) :]: v for k, v in state.items() if k.startswith(SEGMENTER_PREFIX)}
    backbone_state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not segmenter_state or not backbone_state:
        raise ValueError(
            f"{key}={ckpt_path!r} was written by method {info.get('method')}, which has no query segmenter "
            f"(backbone + QuerySegmenter, e.g. QueryBaseline); proposals come from a query model: `{produced_by}`"
        )
    model_config = read_model_config(checkpoint, path)
    backbone_cfg = dict(model_config["backbone"])
    backbone_cfg["pretrained"] = None  # the checkpoint holds the trained weights
    backbone = hydra.utils.instantiate(backbone_cfg)
    method_cfg = model_config["method"]
    # query_baseline / split_matching keep the sizes at method.segmenter; methods whose query model is one
    # stream of several (DeOP, multipass_clip trained jointly) at method.proposals.segmenter
    if method_cfg.get("segmenter") is None and isinstance(method_cfg.get("proposals"), Mapping):
        method_cfg = method_cfg["proposals"]
    if method_cfg.get("segmenter") is None:
        raise ValueError(
            f"{key}={ckpt_path!r}: its run's method config has neither method.segmenter nor method.proposals.segmenter; "
            f"proposals come from a query model: `{produced_by}`"
        )
    segmenter_options = dict(method_cfg["segmenter"])
    joint_dim = int(info["teacher"]["embed_dim"])
    segmenter = QuerySegmenter(list(backbone.channels), list(backbone.strides), joint_dim, **segmenter_options)
    for name, module, module_state in (("backbone", backbone, backbone_state), ("segmenter", segmenter, segmenter_state)):
        expected = module.state_dict()
        mismatched = [k for k in module_state if k in expected and module_state[k].shape != expected[k].shape]
        missing = sorted(set(expected) - set(module_state))
        unexpected = sorted(set(module_state) - set(expected))
        if mismatched or missing or unexpected:
            raise ValueError(
                f"{key}={ckpt_path!r}: its {name} tensors do not fit the {name} rebuilt from its run's config "
                f"({len(mismatched)} shape mismatches {mismatched[:2]}, {len(missing)} missing {missing[:2]}, "
                f"{len(unexpected)} unexpected {unexpected[:2]})"
            )
        module.load_state_dict(module_state, strict=True)
    model = ProposalModel(backbone, segmenter, joint_dim, float(method_cfg.get("input_scale", 1.0)), source=str(path))
    log.info(
        "proposals: %s (%s, %d queries, class head %s) loaded frozen from %s",
        info.get("method"), type(backbone).__name__, model.num_queries, model.class_head, path,
    )  # fmt: skip
    return model
