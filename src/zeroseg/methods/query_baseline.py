"""``method=query_baseline``: the query-based mask-classification stack with a text-embedding
classifier, trained on the seen classes (inductive), evaluated over all classes.

backbone → pixel decoder (``msdeform`` Mask2Former | ``fpn`` MaskFormer) → transformer decoder
(``mask2former`` | ``maskformer``) → per query a mask and a class embedding classified against the
training classes' text embeddings plus a learnable "no object" embedding → Hungarian matching and
the set criterion over every decoder layer. Inference: :func:`~zeroseg.toolkit.matching.semantic_inference`
against the text embeddings of all classes, at the size of the images it is given (the whole image or
one sliding window): by default in Mask2Former's order (mask logits upsampled, then sigmoid and the sum
over queries), ``inference_order=score_first`` sums at 1/4 and resizes the scores. This is the
query-based counterpart of ``baseline`` and Split Matching's Table 2 "Baseline"; Split Matching, DeOP
and MAFT reuse its pieces.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.models.query_decoders import QueryPrediction
from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.toolkit.matching import (
    INFERENCE_ORDERS,
    HungarianMatcher,
    InferenceOrder,
    SetCriterion,
    semantic_inference,
    targets_from_labels,
)

__all__ = ["QueryBaseline"]


class QueryBaseline(ZSSMethod):
    """Query-based seen-only baseline (Mask2Former with a CLIP text classifier).

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone` with at least two levels.
        segmenter: keyword arguments of :class:`QuerySegmenter` (sizes, decoder choices).
        matcher: keyword arguments of :class:`~zeroseg.toolkit.matching.HungarianMatcher`.
        criterion: keyword arguments of :class:`~zeroseg.toolkit.matching.SetCriterion`.
        inference_order: ``upsample_first`` (Mask2Former: the mask logits are upsampled to the
            input size before the sigmoid and the sum over queries) or ``score_first`` (the sum at
            1/4, the class scores resized afterwards: cheaper, the stack's earlier behaviour).
        input_scale: the images are resized by this factor (bilinear) before the backbone, in training
            and inference; labels and outputs keep the input size. 1 (default, the recipes) = as given.
            The toy world's 64-px scenes leave a 1/32 map of 2×2 for the decoder's coarsest level;
            Mask2Former's recipes train at 512 px, so the toy setting runs the stack at 1.5× (README).
        calibration: γ added to the unseen classes' query class logits before the softmax, in validation and
            test (METHODS.md "Common protocol": an optional calibration of unseen vs seen scores; Chimera-Seg
            adds its γ to per-pixel logits, a query model has one class distribution per query, so γ goes
            there). 0 (default) = none: Mask2Former, and Split Matching's Table 2 "Baseline". Never applied in
            training, nor to the classes given to ``zeroseg.predict``. docs/query_stack.md measures it in the
            toy world: γ 2 lifts hIoU from 19.6 to 43 but does not steady it across seeds.
    """

    def __init__(
        self,
        backbone: Backbone,
        segmenter: Optional[Mapping[str, Any]] = None,
        matcher: Optional[Mapping[str, Any]] = None,
        criterion: Optional[Mapping[str, Any]] = None,
        inference_order: InferenceOrder = "upsample_first",
        input_scale: float = 1.0,
        calibration: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not input_scale > 0:
            raise ValueError(f"method.input_scale={input_scale!r}: expected a positive factor (1 = images as given)")
        self.input_scale = float(input_scale)
        self.calibration = float(calibration)
        if inference_order not in INFERENCE_ORDERS:
            raise ValueError(f"method.inference_order={inference_order!r} is not one of {list(INFERENCE_ORDERS)}")
        self.inference_order = inference_order
        self.backbone = backbone
        options = dict(segmenter or {})
        if options.get("class_head", "text") != "text":
            raise ValueError("method=query_baseline classifies by text embeddings: segmenter.class_head must be 'text'")
        self.segmenter = QuerySegmenter(list(backbone.channels), list(backbone.strides), self.teacher.embed_dim, **options)
        self.criterion = SetCriterion(HungarianMatcher(**dict(matcher or {})), **dict(criterion or {}))

    def predictions(self, images: Tensor, class_embeddings: Tensor) -> list[QueryPrediction]:
        """Every decoder prediction for ``images`` against ``class_embeddings`` (per-query masks and
        class scores, for methods that re-score proposals). Masks are at 1/4 of the images resized by
        ``input_scale``."""
        if self.input_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.segmenter(self.backbone(images), class_embeddings)

    def predict_logits(self, images: Tensor, class_embeddings: Tensor, class_bias: Optional[Tensor] = None) -> Tensor:
        """Class scores ``(B, K, H, W)`` at the size of ``images`` (a whole image or one sliding window;
        the base resizes them to the label size afterwards, as Mask2Former's ``sem_seg_postprocess``
        resizes its scores to the output size). ``class_bias`` ``(K,)`` is added to every query's logits of
        the K classes (not to "no object") before the softmax."""
        final = self.predictions(images, class_embeddings)[-1]
        class_logits = final.class_logits
        if class_bias is not None:
            class_logits = class_logits + F.pad(class_bias.to(class_logits.dtype), (0, 1))
        return semantic_inference(class_logits, final.mask_logits, images.shape[-2:], self.inference_order)

    def evaluation_logits(self, images: Tensor) -> Tensor:
        """The base's evaluation scores, with γ on the unseen classes' query logits (``calibration``)."""
        if self.calibration == 0.0:
            return super().evaluation_logits(images)
        bias = torch.zeros(self.split.num_classes, device=images.device)
        bias[torch.as_tensor(self.unseen_class_ids, dtype=torch.long, device=images.device)] = self.calibration
        return self.predict_logits(images, self.class_text_embeddings, bias)

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        targets = targets_from_labels(batch["label"], self.ignore_index)
        return self.criterion(self.predictions(batch["image"], self.train_text_embeddings), targets)
