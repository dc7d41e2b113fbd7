"""``method=deop``: Decoupled One-Pass network (DeOP; Han, Zhong, Li, Han, Ma, ICCV 2023, deop.txt).

Two streams (Sec. 3.1, Fig. 2):

1. **Proposals** — the stack's class-agnostic query model (MaskFormer/Mask2Former with the classification
   branch removed: ``QuerySegmenter(class_head="none")``, mask losses only, matching without a class cost),
   N = 100 proposals ``M``; trained jointly here (``proposals.ckpt_path: null``) or loaded frozen from an
   earlier run (``proposals.ckpt_path=<run>/checkpoints/last.ckpt``, e.g. a ``query_baseline`` run: its
   masks are used, its class head is not).
2. **Classification** — the frozen CLIP visual encoder run ONCE per image
   (:meth:`~zeroseg.clip.teacher.CLIPTeacher.encode_image_severed`) with Generalized Patch Severance
   (Sec. 4.1, Eq. 2: ``(α·E + (1−α)·Attn)·F_in`` in chosen blocks; default α = 1.0 on the last block and 0
   elsewhere, Table 4) or mask-guided patch severance (MPS, Eq. 1) as an option, visual prompts and
   end-to-end CoOp text context (Sec. 3.2, Table 7; :mod:`zeroseg.clip.prompt_learning`), then
   Classification Anchor Learning (Sec. 4.2, :mod:`zeroseg.models.anchor_decoders`): heatmaps
   ``H = softmax(q·F_V/√d) ∗ M`` (Eq. 3; conv variant Eq. 4), heatmap pooling ``F_I = H ⊙ F_V``, class
   scores ``F_C`` = cosine of ``F_I`` with the (prompted) text embeddings and a learnable no-object embedding,
   divided by ``temperature``, and ``O = F_C·M`` (Σ_q softmax(F_C)_q[:K] · sigmoid(M)_q). No ensemble with
   the proposal network's scores at inference (Sec. 4).

Loss (Sec. 3.2 "Training of baseline+", used by DeOP, Sec. 4): dice + focal on the segmentation output O
(per pixel, against the seen labels; ignore pixels left out). O is a sum of probabilities, not a logit: it
enters both terms as ``p = sigmoid(s·(O − 1))`` with ``s = loss.output_scale`` (3, the public code's
``OUTPUT_SIG``; the paper is silent). The term weights are not given in the paper (default 1 / 1); the
public recipe weights them 2.0 / 0.8 — its "CE" term is in fact this focal term — pinned in the recipes.
``loss.classification: ce`` is a per-pixel cross-entropy over the classes of O instead of the focal term.
In joint training the proposal network adds its own set-criterion mask losses (BCE + dice on points), and
its masks are detached from the classification stream by default (``proposals.detach_masks``: the paper
trains class-agnostic proposals with mask losses only; the public code freezes them).

Only the prompts, CAL, the no-object embedding and (joint) the proposal network train; the teacher's weights
never change and are never checkpointed.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.clip.prompt_learning import TextPromptLearner, VisualPrompts
from zeroseg.inference import resize_logits
from zeroseg.methods.base import ZSSMethod
from zeroseg.models.anchor_decoders import build_anchor_decoder, heatmap_pooling, mask_pooling
from zeroseg.models.backbones import Backbone
from zeroseg.models.proposals import load_proposal_model
from zeroseg.models.query_decoders import QueryPrediction
from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.toolkit.matching import INFERENCE_ORDERS, HungarianMatcher, InferenceOrder, SetCriterion, semantic_inference, targets_from_labels
from zeroseg.toolkit.set_losses import mask_dice_loss, sigmoid_focal_loss

__all__ = ["DeOP", "deop_segmentation_losses"]

CLASSIFICATION_LOSSES: tuple[str, ...] = ("focal", "ce")
PRODUCED_BY = "python -m zeroseg.train method=query_baseline (or method=deop with proposals.ckpt_path=null)"


def deop_segmentation_losses(
    scores: Tensor,
    labels: Tensor,
    ignore_index: int,
    classification: Literal["focal", "ce"] = "focal",
    classification_weight: float = 1.0,
    dice_weight: float = 1.0,
    output_scale: float = 3.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """DeOP's loss on the segmentation output ``O`` ``scores (B, K, H, W)`` (Σ_q softmax·sigmoid, at the
    label size) against ``labels (B, H, W)`` (training ids, ``ignore_index`` left out).

    * ``focal``: sigmoid focal loss (Lin et al.) of ``p = sigmoid(s·(O − 1))`` against the one-hot labels,
      averaged over valid pixels × classes; ``ce``: ``−log(O_y / Σ_k O_k)`` averaged over valid pixels.
    * ``dice``: one dice per image over all (class, valid pixel) entries of ``p`` (the public code's
      ``dice_loss_ignore``), averaged over images.
    """
    if classification not in CLASSIFICATION_LOSSES:
        raise ValueError(f"method.loss.classification={classification!r} is not one of {list(CLASSIFICATION_LOSSES)}")
    batch, classes = scores.shape[:2]
    valid = labels != ignore_index
    one_hot = F.one_hot(labels.clamp(max=classes - 1).masked_fill(~valid, 0), classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * valid.unsqueeze(1)
    logits = output_scale * (scores.float() - 1.0)
    weight = valid.unsqueeze(1).expand_as(logits).float()
    count = weight.sum().clamp_min(1.0)
    if classification == "focal":
        classification_term = sigmoid_focal_loss(logits, one_hot, focal_alpha, focal_gamma, weight=weight, normalizer=float(count))
    else:
        log_probabilities = torch.log(scores.float().clamp_min(1e-8)) - torch.log(scores.float().sum(1, keepdim=True).clamp_min(1e-8))
        classification_term = F.nll_loss(log_probabilities, labels.masked_fill(~valid, ignore_index), ignore_index=ignore_index)
        if not bool(valid.any()):
            classification_term = scores.sum() * 0.0
    dice = mask_dice_loss(logits.reshape(batch, -1), one_hot.reshape(batch, -1), valid=weight.reshape(batch, -1)).mean()
    terms = {classification: classification_weight * classification_term, "dice": dice_weight * dice}
    return terms


class DeOP(ZSSMethod):
    """Decoupled One-Pass network (see the module docstring for the paper map).

    Args:
        backbone: the proposal network's backbone (joint training; unused with ``proposals.ckpt_path``).
        proposals: ``ckpt_path`` (null: trained jointly), ``segmenter`` (:class:`QuerySegmenter` sizes;
            ``class_head`` is forced to ``none``), ``matcher`` / ``criterion`` (mask terms; the class cost is
            zero), ``input_scale`` (images resized before the backbone, as ``query_baseline``), ``detach_masks``
            (default true: the classification loss does not reach the proposal network).
        severance: ``gps_alphas`` — α per block for the LAST ``len(gps_alphas)`` blocks (Table 4's
            ``[α₋₂, α₋₁]``; default ``[1.0]``: complete severance of the last block, Table 4's best);
            ``mps_layers`` — blocks using MPS (Eq. 1) instead; ``mps_normalization`` — ``softmax`` (public
            code) | ``sum`` (see :func:`~zeroseg.clip.teacher.mask_guided_attention`).
        visual_prompts: :class:`~zeroseg.clip.prompt_learning.VisualPrompts` options (``mode`` adding |
            prepending | none, ``num_tokens``, ``position_layers``, ``init_std``).
        text_prompts: ``enabled``, ``trainable`` (false: the context stays as initialised, e.g. an offline-learnt
            one, Table 7's first row) and :class:`~zeroseg.clip.prompt_learning.TextPromptLearner` options
            (``context_init`` template | random | file, ``context_length``, ``context_file``).
        cal: ``decoder`` (query | conv | none = the baseline's mask pooling) and the decoders' sizes
            (``layers`` K, ``heads``, ``ffn_dim``, ``dropout``, ``heatmap_heads``, ``heatmap_projections``,
            ``conv_channels``); see :mod:`zeroseg.models.anchor_decoders`.
        loss: ``classification`` (focal | ce), ``classification_weight``, ``dice_weight``, ``output_scale``,
            ``focal_alpha``, ``focal_gamma`` (see :func:`deop_segmentation_losses`).
        temperature: the cosine classifier's temperature (the public code's logit scale 100 → 0.01).
        inference_order: where the masks are upsampled in ``O = F_C·M`` (see ``semantic_inference``).
    """

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        proposals: Optional[Mapping[str, Any]] = None,
        severance: Optional[Mapping[str, Any]] = None,
        visual_prompts: Optional[Mapping[str, Any]] = None,
        text_prompts: Optional[Mapping[str, Any]] = None,
        cal: Optional[Mapping[str, Any]] = None,
        loss: Optional[Mapping[str, Any]] = None,
        temperature: float = 0.01,
        inference_order: InferenceOrder = "upsample_first",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if inference_order not in INFERENCE_ORDERS:
            raise ValueError(f"method.inference_order={inference_order!r} is not one of {list(INFERENCE_ORDERS)}")
        if not temperature > 0:
            raise ValueError(f"method.temperature={temperature!r}: expected a positive temperature")
        self.inference_order, self.temperature = inference_order, float(temperature)
        visual = self.teacher.model.visual
        num_blocks = len(visual.transformer.resblocks)
        joint_dim = self.teacher.embed_dim

        # stream 1: proposals
        proposal_options = dict(proposals or {})
        self.detach_masks = bool(proposal_options.pop("detach_masks", True))
        ckpt_path = proposal_options.pop("ckpt_path", None)
        self.proposal_model: Optional[nn.Module] = None
        if ckpt_path:
            self.proposal_model = load_proposal_model(ckpt_path, "method.proposals.ckpt_path", PRODUCED_BY)
            num_queries = self.proposal_model.num_queries
            self.proposal_criterion: Optional[SetCriterion] = None
        else:
            if backbone is None:
                raise ValueError("method=deop trains its proposal network jointly without proposals.ckpt_path: it needs a backbone")
            input_scale = float(proposal_options.pop("input_scale", 1.0))
            if not input_scale > 0:
                raise ValueError(f"method.proposals.input_scale={input_scale!r}: expected a positive factor")
            self.input_scale = input_scale
            segmenter = dict(proposal_options.pop("segmenter", None) or {})
            if segmenter.get("class_head", "none") != "none":
                raise ValueError("method=deop proposals are class-agnostic (Sec. 3.1): method.proposals.segmenter.class_head must be 'none'")
            segmenter["class_head"] = "none"
            matcher = {**dict(proposal_options.pop("matcher", None) or {}), "cost_class": 0.0}
            criterion = dict(proposal_options.pop("criterion", None) or {})
            if proposal_options:
                raise ValueError(f"method.proposals has unknown keys {sorted(proposal_options)}")
            self.backbone = backbone
            self.segmenter = QuerySegmenter(list(backbone.channels), list(backbone.strides), joint_dim, **segmenter)
            self.proposal_criterion = SetCriterion(HungarianMatcher(**matcher), **criterion)
            num_queries = int(self.segmenter.decoder.num_queries)

        # stream 2: severance, prompts, CAL
        options = dict(severance or {})
        alphas = [float(a) for a in options.pop("gps_alphas", [1.0])]
        if len(alphas) > num_blocks:
            raise ValueError(f"method.severance.gps_alphas has {len(alphas)} values for a tower of {num_blocks} blocks")
        self.gps_alphas = {num_blocks - len(alphas) + i: alpha for i, alpha in enumerate(alphas) if alpha != 0.0}
        self.mps_layers = [int(layer) for layer in options.pop("mps_layers", [])]
        self.mps_normalization = str(options.pop("mps_normalization", "softmax"))
        if options:
            raise ValueError(f"method.severance has unknown keys {sorted(options)}")
        prompts = dict(visual_prompts or {})
        self.visual_prompts = VisualPrompts(visual.transformer.width, tuple(visual.grid_size), num_blocks, **prompts)
        text = dict(text_prompts or {})
        enabled, trainable = bool(text.pop("enabled", True)), bool(text.pop("trainable", True))
        self.text_prompts = TextPromptLearner(self.teacher, **text) if enabled else None
        if self.text_prompts is not None and not trainable:
            self.text_prompts.requires_grad_(False)  # an offline-learnt context kept fixed (Table 7, first row)
        cal_options = dict(cal or {})
        self.cal = build_anchor_decoder(str(cal_options.pop("decoder", "query")), joint_dim, num_queries, **cal_options)
        self.no_object_embedding = nn.Parameter(torch.randn(joint_dim) * joint_dim**-0.5)
        # learnt-context text embeddings per class-name list, outside training only (text_embeddings)
        self._eval_text_cache: dict[tuple[str, ...], Tensor] = {}
        self.loss_options = dict(loss or {})
        deop_segmentation_losses(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), 255, **self.loss_options)  # validate keys

    # -- the two streams -------------------------------------------------------------------------------
    def proposal_predictions(self, images: Tensor) -> list[QueryPrediction]:
        """The proposal network's predictions (mask logits at 1/4 of the images after its input scale)."""
        if self.proposal_model is not None:
            return self.proposal_model(images)
        if self.input_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.segmenter(self.backbone(images))

    def text_embeddings(self, class_names: Sequence[str], fixed: Tensor) -> Tensor:
        """The classifier: the learnt-context text embeddings of ``class_names`` (CoOp), or ``fixed`` (the
        teacher's template embeddings) without text prompts. Outside training they are computed once and
        kept until the module trains again: the context cannot change in eval mode, and the text tower over
        every class name would otherwise cost ~1 TFLOP per test image at COCO-Stuff's 171 classes."""
        if self.text_prompts is None:
            return fixed
        if self.training or torch.is_grad_enabled():
            return self.text_prompts(self.teacher, class_names)
        key = tuple(class_names)
        cached = self._eval_text_cache.get(key)
        if cached is None or cached.device != fixed.device:
            cached = self._eval_text_cache[key] = self.text_prompts(self.teacher, class_names)
        return cached

    def open_vocabulary_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """Any class names through the learnt text context (CoOp), as :meth:`segment` classifies its own."""
        return self.text_embeddings(class_names, self.teacher.encode_text(class_names))

    def train(self, mode: bool = True) -> "DeOP":
        cache = self.__dict__.get("_eval_text_cache")
        if cache:
            cache.clear()  # the context may change from here on
        return super().train(mode)

    def classify_proposals(self, images: Tensor, mask_logits: Tensor, text_embeddings: Tensor) -> Tensor:
        """Class logits ``(B, N, K+1)`` of the proposals (last column: no object): one severed, prompted
        teacher pass → F_V; CAL heatmaps (or mask pooling) → F_I; cosine with the text embeddings / τ."""
        masks = mask_logits.sigmoid()
        if self.detach_masks or self.proposal_model is not None:
            masks = masks.detach()
        patch = self.teacher.patch_size
        grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        prompts = self.visual_prompts(grid)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.visual_prompts.parameters())
        with torch.set_grad_enabled(needs_grad):
            _, dense = self.teacher.encode_image_severed(
                images, self.gps_alphas, self.mps_layers, masks, self.mps_normalization, prompts
            )
        features = F.normalize(dense.float(), dim=1)
        grid_masks = F.interpolate(masks.float(), size=features.shape[-2:], mode="bilinear", align_corners=False)
        if self.cal is None:
            pooled = mask_pooling(grid_masks, features)
        else:
            pooled = heatmap_pooling(self.cal(features, grid_masks), features)
        classes = torch.cat([text_embeddings.to(pooled.dtype), self.no_object_embedding[None].to(pooled.dtype)])
        return F.normalize(pooled, dim=-1) @ F.normalize(classes, dim=-1).t() / self.temperature

    # -- ZSSMethod --------------------------------------------------------------------------------------
    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """``O = F_C·M`` ``(B, K, H, W)`` at the size of ``images`` against ``class_embeddings``."""
        mask_logits = self.proposal_predictions(images)[-1].mask_logits
        class_logits = self.classify_proposals(images, mask_logits, class_embeddings)
        return semantic_inference(class_logits, mask_logits.float(), images.shape[-2:], self.inference_order)

    def segment(self, images: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        # the classifier of all classes with the learnt text context (computed once per call)
        embeddings = self.text_embeddings(self.class_names, self.class_text_embeddings)
        logits = self.inference(lambda x: self.predict_logits(x, embeddings), images)
        return self.calibrate_logits(resize_logits(logits, size if size is not None else images.shape[-2:]))

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        predictions = self.proposal_predictions(images)
        mask_logits = predictions[-1].mask_logits
        text_embeddings = self.text_embeddings(self.train_class_names, self.train_text_embeddings)
        class_logits = self.classify_proposals(images, mask_logits, text_embeddings)
        masks_for_output = mask_logits.detach() if (self.detach_masks or self.proposal_model is not None) else mask_logits
        scores = semantic_inference(class_logits, masks_for_output.float(), labels.shape[-2:], "upsample_first")
        losses = deop_segmentation_losses(scores, labels, self.ignore_index, **self.loss_options)
        if self.proposal_criterion is not None:
            proposal_terms = self.proposal_criterion(predictions, targets_from_labels(labels, self.ignore_index))
            losses.update({f"proposal_{name}": value for name, value in proposal_terms.items() if name != "loss"})
        losses["loss"] = sum(losses.values())
        return losses
