"""``method=multipass_clip``: the decoupled multi-pass "frozen CLIP" baseline (ZegFormer, Ding et al. CVPR
2022; SimBaseline / zsseg, Xu et al. ECCV 2022) — DeOP's Fig. 1(b) and the speed reference of its Table 1.

The same query proposals as ``deop`` and ``maft``; each proposal is classified by its own pass through the
frozen teacher: the proposal's mask (sigmoid ≥ ``mask_threshold``) is cropped to its box, pixels outside the
mask filled with CLIP's mean colour, resized to ``crop_size`` and encoded, all crops of a batch in chunks of
``max_regions_per_forward`` (:func:`~zeroseg.toolkit.region_tokens.encode_masks` with ``encoder="crop"``).
CLIP's class probabilities ``A^c = softmax(cos(region, text) / temperature)`` optionally ensemble with the
proposal network's own ``A^p`` (MAFT Eq. 9): seen classes ``A^p^λ · A^c^(1−λ)``, unseen ``A^c^λ``; then
``O = Âᵀ·M`` (Σ over proposals of class probability × sigmoid mask). Empty proposals take no part.

Proposals: trained here like ``query_baseline`` (seen classes, text head, the set criterion; CLIP plays no
part in training) or, with ``proposals.ckpt_path``, loaded frozen from an earlier run; then the method has
nothing to train (``trainable`` is False for that instance) and is evaluated directly
(``python -m zeroseg.eval method=multipass_clip method.proposals.ckpt_path=<ckpt>``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.models.proposals import load_proposal_model
from zeroseg.models.query_decoders import QueryPrediction
from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.toolkit.matching import HungarianMatcher, SetCriterion, targets_from_labels
from zeroseg.toolkit.region_tokens import encode_masks

__all__ = ["MultipassCLIP", "ensemble_class_probabilities"]

PRODUCED_BY = "python -m zeroseg.train method=query_baseline (or method=multipass_clip with proposals.ckpt_path=null)"


def ensemble_class_probabilities(clip_probabilities: Tensor, proposal_probabilities: Tensor, unseen: Tensor, weight: float) -> Tensor:
    """MAFT Eq. 9: ``Â = A^p^λ · A^c^(1−λ)`` on seen classes and ``A^c^λ`` on unseen classes (``unseen (K,)``
    bool), for ``(…, K)`` probabilities; λ = ``weight`` (MAFT: 0.6–0.8)."""
    seen_part = proposal_probabilities.clamp_min(0).pow(weight) * clip_probabilities.pow(1.0 - weight)
    return torch.where(unseen.to(clip_probabilities.device), clip_probabilities.pow(weight), seen_part)


class MultipassCLIP(ZSSMethod):
    """Multi-pass frozen-CLIP proposal classification (ZegFormer / SimBaseline).

    Args:
        backbone: the proposal network's backbone (when it is trained here).
        proposals: ``ckpt_path`` (null: train a ``query_baseline``-style network here), ``segmenter``,
            ``matcher``, ``criterion`` (as ``query_baseline``), ``input_scale``.
        mask_threshold: a proposal's binary mask is sigmoid ≥ this (0.5, zsseg's).
        crop_size: the CLIP input of each crop (224, CLIP's own).
        max_regions_per_forward: crops per teacher forward.
        temperature: CLIP's cosine classifier temperature (0.01 = CLIP's logit scale 100).
        ensemble: ``true`` (ZegFormer/SimBaseline's heuristic) combines with the proposal network's scores by
            MAFT Eq. 9 with ``ensemble_weight`` λ (0.7); needs a proposal network with a text class head.
    """

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        proposals: Optional[Mapping[str, Any]] = None,
        mask_threshold: float = 0.5,
        crop_size: int = 224,
        max_regions_per_forward: int = 64,
        temperature: float = 0.01,
        ensemble: bool = True,
        ensemble_weight: float = 0.7,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(f"method.ensemble_weight={ensemble_weight!r}: expected λ in [0, 1] (MAFT Eq. 9)")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"method.mask_threshold={mask_threshold!r}: expected a sigmoid threshold in (0, 1)")
        self.mask_threshold, self.crop_size = float(mask_threshold), int(crop_size)
        self.max_regions_per_forward, self.temperature = int(max_regions_per_forward), float(temperature)
        self.ensemble, self.ensemble_weight = bool(ensemble), float(ensemble_weight)
        options = dict(proposals or {})
        ckpt_path = options.pop("ckpt_path", None)
        self.proposal_model: Optional[nn.Module] = None
        self.criterion: Optional[SetCriterion] = None
        if ckpt_path:
            self.proposal_model = load_proposal_model(ckpt_path, "method.proposals.ckpt_path", PRODUCED_BY)
            self.trainable = False  # nothing left to train: evaluated like clip_zero_shot
            class_head = self.proposal_model.class_head
        else:
            if backbone is None:
                raise ValueError("method=multipass_clip trains its proposal network without proposals.ckpt_path: it needs a backbone")
            self.input_scale = float(options.pop("input_scale", 1.0))
            segmenter = dict(options.pop("segmenter", None) or {})
            class_head = segmenter.setdefault("class_head", "text")
            self.backbone = backbone
            self.segmenter = QuerySegmenter(list(backbone.channels), list(backbone.strides), self.teacher.embed_dim, **segmenter)
            matcher = dict(options.pop("matcher", None) or {})
            criterion = dict(options.pop("criterion", None) or {})
            if class_head == "none":
                matcher["cost_class"] = 0.0
            self.criterion = SetCriterion(HungarianMatcher(**matcher), **criterion)
            if options:
                raise ValueError(f"method.proposals has unknown keys {sorted(options)}")
        if self.ensemble and class_head != "text":
            raise ValueError(
                f"method.ensemble=true combines CLIP with the proposal network's class scores, but its class head is "
                f"{class_head!r}; set method.ensemble=false or use proposals with a text head (query_baseline)"
            )

    def proposal_predictions(self, images: Tensor, class_embeddings: Optional[Tensor]) -> list[QueryPrediction]:
        if self.proposal_model is not None:
            return self.proposal_model(images, class_embeddings)
        if self.input_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.segmenter(self.backbone(images), class_embeddings)

    @torch.no_grad()
    def clip_class_probabilities(self, images: Tensor, binary_masks: Tensor, valid: Tensor, class_embeddings: Tensor) -> Tensor:
        """``A^c (B, N, K)``: each valid proposal's crop through the frozen teacher, softmax over the classes
        of ``cos / temperature``; invalid (empty) proposals are zeros."""
        tokens = encode_masks(
            self.teacher, images, binary_masks, valid, "crop", self.crop_size, self.max_regions_per_forward
        )
        logits = F.normalize(tokens.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).t() / self.temperature
        return logits.softmax(dim=-1) * valid.unsqueeze(-1)

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        final = self.proposal_predictions(images, class_embeddings)[-1]
        mask_logits = F.interpolate(final.mask_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        binary_masks = mask_logits.sigmoid() >= self.mask_threshold
        valid = binary_masks.flatten(2).any(dim=-1)
        probabilities = self.clip_class_probabilities(images, binary_masks, valid, class_embeddings)
        if self.ensemble and final.class_logits is not None:
            proposal_probabilities = final.class_logits.float().softmax(-1)[..., :-1]
            unseen = torch.zeros(probabilities.shape[-1], dtype=torch.bool, device=probabilities.device)
            if probabilities.shape[-1] == len(self.class_names):  # all classes: the split says which are unseen
                unseen[self.unseen_class_ids] = True
            probabilities = ensemble_class_probabilities(probabilities, proposal_probabilities, unseen, self.ensemble_weight)
            probabilities = probabilities * valid.unsqueeze(-1)
        return torch.einsum("bqk,bqhw->bkhw", probabilities, mask_logits.sigmoid())

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.criterion is None:
            raise RuntimeError(
                "method=multipass_clip with method.proposals.ckpt_path has nothing to train (the proposals and CLIP are "
                "frozen): evaluate it with python -m zeroseg.eval"
            )
        targets = targets_from_labels(batch["label"], self.ignore_index)
        return self.criterion(self.proposal_predictions(batch["image"], self.train_text_embeddings), targets)
