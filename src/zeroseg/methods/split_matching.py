"""``method=split_matching``: Split Matching for inductive zero-shot segmentation (split_matching.txt,
Chen et al., Sec. 3.2–3.4, Eqs. 1–3, Figs. 2–4, Tables 1–4).

The Mask2Former query model of ``query_baseline`` (:class:`~zeroseg.models.query_segmenter.QuerySegmenter`)
with every query giving a semantic vector V in the CLIP joint space and a mask M (Sec. 3.2):

* **queries** split into ``K_s`` seen queries (``segmenter.num_queries``) and ``K_u`` candidate queries
  (``candidate_queries``); the paper gives no counts: 100 and 50 (METHODS.md);
* **pseudo masks and candidate embeddings** (Sec. 3.2, Eq. 1): the teacher's dense tokens are clustered
  over the unannotated area (:func:`~zeroseg.toolkit.generate_pseudo_masks`, CLIP-to-Seg's multi-scale
  K-means and merging) into the candidate segments Y_u; ``C_u`` = the teacher's CLS token of each masked
  region (:func:`~zeroseg.toolkit.encode_regions`, literal ``masked_image`` by default, ``crop`` /
  ``attention`` as options). Table 3's other rows take ``C_u`` from the MFE features instead
  (``candidate_embedding``: ``features`` = region means of F_u, ``features_mlp`` = those through an MLP);
* **class similarity** ``S = sigmoid(V·Eᵀ)`` with ``E = cat(A_s, C_u)`` per image, for both groups
  (:func:`class_similarity_logits`). V and E are compared by cosine divided by ``temperature`` (0.07,
  CLIP's) plus ``logit_bias`` (0) — the paper's bare dot product has no scale (``similarity: dot`` keeps
  it literally); the scale is ours, as in the text classifier of ``query_baseline``;
* **split Hungarian matching** (Eq. 2): seen queries ↔ the seen-class segments of Y_s, candidate queries
  ↔ the segments of Y_u, through the stack's grouped matcher (``query_groups`` + ``Targets.groups``), the
  two assignments concatenated. The cost is ``−S`` at the target's column of E plus the mask BCE and dice
  (Mask2Former's 2 / 5 / 5 weights, :class:`SplitMatcher`). An image without a candidate region leaves
  every candidate query unmatched;
* **L_match** (Eq. 3, :class:`SplitCriterion`): sigmoid focal loss on S (a matched query's target is its
  segment's column of E, every other column and every unmatched query's row 0 = "none"), IoU loss +
  dice loss on the matched masks (importance-sampled points, as Mask2Former); **L_cos** = 1 − cos(V_u, C_u)
  over the matched candidate queries; L_SM = L_match + L_cos, every decoder layer supervised (Mask2Former's
  deep supervision). Weights are not given: focal 2, IoU 5, dice 5, BCE 5, cos 1 (Mask2Former's class /
  mask / dice weights plus the paper's IoU loss at the mask weight). Mask2Former's mask BCE stays by
  default although Eq. 3 names only IoU + dice ("all other hyperparameters unchanged", Sec. 4): with
  IoU + dice alone every mask saturated to all-on within 100 toy steps (sigmoid ≈ 1 everywhere, whose
  dice/IoU gradient vanishes; test sIoU 12 after 300 steps) where BCE keeps a gradient (sIoU 55 after
  100 steps); ``criterion.bce_weight: 0`` is the literal Eq. 3;
* **Multi-scale Feature Enhancement** (Sec. 3.3, :class:`MultiScaleFeatureEnhancement`): a dense block
  (3×3 conv + GroupNorm + ReLU; ``mfe_norm`` ``bn`` / ``none`` for Table 4) on each of the pixel
  decoder's three maps F0 (coarsest), F1, F2; F0' resized and added to F1', the sum resized and added
  to F2' → F_u in the joint space, classified against E by cosine / ``temperature``;
  L_MFE = CE + softmax focal against Y_p = Y_s ∪ Y_u (weights 1 and 1). Training only: inference
  never calls it (Sec. 3.4);
* **inference** (Sec. 3.4): seen + candidate queries plus ``K_r`` randomly initialised queries
  (``random_queries``, 50 in the paper's Implementation Details), classified against the text embeddings
  of all classes; per pixel ``Σ_q S_q · sigmoid(M_q)`` (:func:`sigmoid_semantic_inference`). The random
  queries (features and positions) are drawn N(0, 1) — the distribution the learned queries start from
  (``nn.Embedding``) — from a generator seeded by ``random_query_seed``: the same queries at every call
  and on every device, unless ``random_query_refresh`` draws fresh ones per call (a seeded stream).

Total loss L = L_SM + L_MFE (Sec. 3.4). Knobs the paper leaves open are constructor arguments with the
METHODS.md default (or, where METHODS.md is silent too, the value named above).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from math import gcd
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.models.backbones import Backbone
from zeroseg.models.query_decoders import QueryHeads, QueryPrediction
from zeroseg.toolkit import encode_regions, generate_pseudo_masks, padded_regions
from zeroseg.toolkit.dense import latent_class_embeddings, region_means, seen_and_latent_logits
from zeroseg.toolkit.losses import softmax_focal_loss
from zeroseg.toolkit.matching import (
    INFERENCE_ORDERS,
    HungarianMatcher,
    InferenceOrder,
    PaddingMode,
    Targets,
    check_padding_mode,
    point_sample,
    uncertain_point_coords,
)
from zeroseg.toolkit.set_losses import mask_dice_loss, sigmoid_focal_loss, soft_iou_loss

__all__ = [
    "ExtendableQueries",
    "MultiScaleFeatureEnhancement",
    "SemanticPrediction",
    "SemanticQueryHeads",
    "SplitCriterion",
    "SplitMatcher",
    "SplitMatching",
    "SplitSegmenter",
    "candidate_cosine_loss",
    "class_similarity_logits",
    "sigmoid_semantic_inference",
    "split_targets",
]

SEEN, CANDIDATE, RANDOM = 0, 1, 2
QUERY_GROUPS = {"seen": SEEN, "candidate": CANDIDATE, "random": RANDOM}
CANDIDATE_EMBEDDINGS = ("cls_tokens", "features", "features_mlp")
MFE_NORMS = ("gn", "bn", "none")
SIMILARITIES = ("cosine", "dot")


def _check(value: str, choices: Sequence[str], key: str) -> str:
    if value not in choices:
        raise ValueError(f"method.{key}={value!r} is not one of {list(choices)}")
    return value


# -- the query model ------------------------------------------------------------------------------


@dataclass
class SemanticPrediction(QueryPrediction):
    """One decoder prediction of Split Matching: ``mask_logits (B, Q, h, w)`` and the semantic vectors
    ``embeddings (B, Q, C)`` (V, Sec. 3.2); ``class_logits`` stays ``None`` (S depends on each image's E)."""

    embeddings: Optional[Tensor] = None


class SemanticQueryHeads(nn.Module):
    """Per-query mask (the stack's mask head, reused) and semantic vector V = Linear(LayerNorm(query)) in
    the joint space."""

    def __init__(self, mask_heads: QueryHeads, joint_dim: int) -> None:
        super().__init__()
        if mask_heads.class_head != "none":
            raise ValueError("SemanticQueryHeads wraps a class-agnostic QueryHeads (class_head='none')")
        self.mask_heads = mask_heads
        self.semantic_embed = nn.Linear(mask_heads.norm.normalized_shape[0], joint_dim)

    def forward(self, queries: Tensor, mask_features: Tensor, class_embeddings: Optional[Tensor] = None) -> SemanticPrediction:
        masks = self.mask_heads(queries, mask_features).mask_logits
        return SemanticPrediction(None, masks, self.semantic_embed(self.mask_heads.norm(queries)))


class ExtendableQueries(nn.Module):
    """A learned query table (``nn.Embedding``) whose ``weight`` can be extended by extra rows for one call
    (the random queries of inference, Sec. 3.4) without touching the decoder's code."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table
        self.extra: Optional[Tensor] = None

    @property
    def weight(self) -> Tensor:
        weight = self.table.weight
        return weight if self.extra is None else torch.cat([weight, self.extra.to(weight)])


class SplitSegmenter(QuerySegmenter):
    """The query stack with ``num_queries`` seen and ``candidate_queries`` candidate queries (in that
    order), semantic heads, and room for extra queries at inference.

    Args: those of :class:`~zeroseg.models.query_segmenter.QuerySegmenter` (sizes, decoder choices; the
    class head is :class:`SemanticQueryHeads`), plus ``candidate_queries`` (K_u).

    ``forward(features)`` returns ``(predictions, multi_scale)``: every decoder prediction (the last is
    final) and the pixel decoder's multi-scale maps (coarsest first) for the MFE.
    """

    def __init__(
        self,
        backbone_channels: list[int],
        backbone_strides: list[int],
        joint_dim: int,
        num_queries: int = 100,
        candidate_queries: int = 50,
        **options: Any,
    ) -> None:
        for key in ("class_head", "temperature"):
            if key in options:
                raise ValueError(
                    f"method.segmenter.{key} does not apply to split_matching: queries give semantic vectors "
                    "compared by method.similarity / method.temperature"
                )
        if num_queries < 1 or candidate_queries < 1:
            raise ValueError(f"split_matching needs seen and candidate queries, got {num_queries} and {candidate_queries}")
        super().__init__(
            backbone_channels, backbone_strides, joint_dim, class_head="none", num_queries=num_queries + candidate_queries, **options
        )
        self.num_seen_queries, self.num_candidate_queries = num_queries, candidate_queries
        self.decoder.heads = SemanticQueryHeads(self.decoder.heads, joint_dim)
        self.decoder.query_pos = ExtendableQueries(self.decoder.query_pos)
        if self.decoder.query_feat is not None:  # MaskFormer starts from zero features
            self.decoder.query_feat = ExtendableQueries(self.decoder.query_feat)

    @property
    def query_dim(self) -> int:
        return self.decoder.dim

    def query_groups(self, extra: int = 0, device=None) -> Tensor:
        """Group id per query: 0 seen, 1 candidate, 2 the ``extra`` (random) ones, in decoder order."""
        return torch.tensor(
            [SEEN] * self.num_seen_queries + [CANDIDATE] * self.num_candidate_queries + [RANDOM] * extra,
            dtype=torch.long,
            device=device,
        )

    @contextmanager
    def extra_queries(self, features: Optional[Tensor], positions: Tensor) -> Iterator[None]:
        """Within the block, the decoder runs with these queries appended (``(K, dim)`` each)."""
        tables = [self.decoder.query_pos] + ([self.decoder.query_feat] if self.decoder.query_feat is not None else [])
        try:
            self.decoder.query_pos.extra = positions
            if self.decoder.query_feat is not None:
                self.decoder.query_feat.extra = features
            yield
        finally:
            for table in tables:
                table.extra = None

    def forward(self, features: list[Tensor], class_embeddings: Optional[Tensor] = None) -> tuple[list[SemanticPrediction], list[Tensor]]:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features), multi_scale


def class_similarity_logits(
    embeddings: Tensor, class_embeddings: Tensor, similarity: str = "cosine", temperature: float = 0.07, bias: float = 0.0
) -> Tensor:
    """Logits of ``S = sigmoid(V·Eᵀ)`` (Sec. 3.2): ``V (B, Q, C)`` against ``E (N, C)`` or per image
    ``(B, N, C)`` → ``(B, Q, N)``. ``cosine``: ``cos(V, E) / temperature + bias``; ``dot``: the literal
    ``V·Eᵀ + bias``."""
    embeddings = embeddings.float()
    class_embeddings = class_embeddings.float()
    if similarity == "cosine":
        embeddings = F.normalize(embeddings, dim=-1)
        class_embeddings = F.normalize(class_embeddings, dim=-1) / temperature
    if class_embeddings.dim() == 2:
        return embeddings @ class_embeddings.t() + bias
    return embeddings @ class_embeddings.transpose(1, 2) + bias


def sigmoid_semantic_inference(
    class_probs: Tensor, mask_logits: Tensor, size: Optional[Sequence[int]] = None, order: InferenceOrder = "upsample_first"
) -> Tensor:
    """Per-pixel scores ``(B, K, H, W) = Σ_q S_q,k · sigmoid(M_q)`` for independent (sigmoid) class scores
    ``class_probs (B, Q, K)`` — :func:`~zeroseg.toolkit.matching.semantic_inference` without the softmax and
    the no-object column; ``size`` / ``order`` as there."""
    if order not in INFERENCE_ORDERS:
        raise ValueError(f"inference_order={order!r} is not one of {list(INFERENCE_ORDERS)}")
    resize = size is not None and tuple(size) != tuple(mask_logits.shape[-2:])
    if resize and order == "upsample_first":
        mask_logits = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    scores = torch.einsum("bqk,bqhw->bkhw", class_probs.to(mask_logits.dtype), mask_logits.sigmoid())
    if resize and order == "score_first":
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return scores


class MultiScaleFeatureEnhancement(nn.Module):
    """Sec. 3.3, Fig. 4: a dense block (conv + norm + ReLU) per pixel-decoder map; coarse to fine, the
    fused map is resized (bilinear) to the next map and added to its refined version → F_u.

    Args:
        in_channels: channels of the pixel decoder's maps; out_channels: channels of F_u (the joint
            dimension C, so that F_u is classified against E).
        levels: maps fused (3: F0, F1, F2).
        norm: ``gn`` (the paper's, Table 4 best), ``bn`` or ``none`` (Table 4's rows).
        groups: GroupNorm groups (32, as the pixel decoder's; reduced to divide ``out_channels``).
        kernel_size: of the dense blocks' conv (3; the paper does not say).
    """

    def __init__(
        self, in_channels: int, out_channels: int, levels: int = 3, norm: str = "gn", groups: int = 32, kernel_size: int = 3
    ) -> None:
        super().__init__()
        _check(norm, MFE_NORMS, "mfe_norm")
        self.levels = levels

        def block() -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none")]
            if norm == "gn":
                layers.append(nn.GroupNorm(gcd(groups, out_channels), out_channels))
            elif norm == "bn":
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.blocks = nn.ModuleList(block() for _ in range(levels))

    def forward(self, multi_scale: Sequence[Tensor]) -> Tensor:
        """``multi_scale``: maps coarsest first (the pixel decoder's order) → F_u at the finest one's size."""
        if len(multi_scale) < self.levels:
            raise ValueError(f"MFE expects {self.levels} pixel-decoder maps, got {len(multi_scale)}")
        fused = self.blocks[0](multi_scale[0])
        for block, feature in zip(self.blocks[1:], multi_scale[1 : self.levels]):
            refined = block(feature)
            fused = F.interpolate(fused, size=refined.shape[-2:], mode="bilinear", align_corners=False) + refined
        return fused


# -- targets, matching and the set criterion -------------------------------------------------------


def split_targets(
    labels: Tensor, candidate_map: Tensor, candidate_labels: Tensor, candidate_valid: Tensor, num_seen: int, ignore_index: int = 255
) -> Targets:
    """Targets of Eq. 2: per image the seen-class segments of ``labels`` (class = seen id, group 0), then one
    segment per valid candidate region ``candidate_map == candidate_labels[b, r]`` (class = its column
    ``num_seen + r`` of E, group 1). Pixels in neither (unannotated, not clustered) are ``Targets.ignore``.
    """
    classes, masks, groups, ignore = [], [], [], []
    for b in range(labels.shape[0]):
        seen = torch.unique(labels[b])
        seen = seen[seen != ignore_index]
        slots = torch.nonzero(candidate_valid[b], as_tuple=True)[0]
        wanted = torch.cat([seen, candidate_labels[b, slots]])
        source = torch.cat([labels[b].expand(len(seen), -1, -1), candidate_map[b].expand(len(slots), -1, -1)])
        masks.append((source == wanted.view(-1, 1, 1)).float())
        classes.append(torch.cat([seen, num_seen + slots]))
        groups.append(torch.cat([torch.full_like(seen, SEEN), torch.full_like(slots, CANDIDATE)]))
        ignore.append(((labels[b] == ignore_index) & (candidate_map[b] == ignore_index)).float())
    return Targets(classes, masks, groups=groups, ignore=ignore)


class SplitMatcher(HungarianMatcher):
    """The stack's Hungarian matcher with the class cost of Split Matching: ``−S = −sigmoid(logits)`` at the
    target's column of E (the logits are independent per column, not a softmax). Mask costs, grouped
    assignment (Eq. 2) and the non-finite check are :class:`~zeroseg.toolkit.matching.HungarianMatcher`'s."""

    @torch.no_grad()
    def cost_terms(self, class_logits: Optional[Tensor], mask_logits: Tensor, targets: Targets) -> dict[str, Tensor]:
        terms = super().cost_terms(None, mask_logits, targets)
        if class_logits is not None:
            batch, queries, t_max = terms["mask"].shape
            columns = torch.zeros(batch, t_max, dtype=torch.long, device=mask_logits.device)
            for b, classes in enumerate(targets.classes):
                columns[b, : len(classes)] = classes
            probs = class_logits.float().sigmoid()
            cost = -torch.gather(probs, 2, columns.unsqueeze(1).expand(-1, queries, -1))
            real = torch.arange(t_max, device=cost.device) < torch.tensor([len(c) for c in targets.classes], device=cost.device).view(-1, 1, 1)
            terms["class"] = cost * real
        return terms


def candidate_cosine_loss(embeddings: Tensor, candidate_embeddings: Tensor) -> Tensor:
    """L_cos = mean over matched candidate queries of ``1 − cos(V'_u, C_u)`` (Sec. 3.2); ``(M, C)`` each.
    No matched candidate: 0 (connected to ``embeddings`` so that the graph stays whole)."""
    if len(embeddings) == 0:
        return embeddings.sum() * 0.0
    return (1 - F.cosine_similarity(embeddings.float(), candidate_embeddings.float(), dim=-1)).mean()


class SplitCriterion(nn.Module):
    """L_SM = L_match + L_cos (Eq. 3) summed over every decoder prediction (deep supervision).

    Args:
        matcher: the :class:`SplitMatcher`.
        focal_weight / iou_weight / dice_weight / bce_weight / cos_weight: term weights (2 / 5 / 5 / 5 / 1
            in the config; the paper gives none: Mask2Former's class / mask / dice weights, its mask BCE kept
            (see the module docstring), the paper's IoU loss at the mask weight). The constructor's
            ``bce_weight`` default 0 is the literal Eq. 3.
        focal_alpha / focal_gamma: of the sigmoid focal loss (0.25 / 2, RetinaNet's).
        num_points / oversample_ratio / importance_ratio / padding_mode: Mask2Former's importance-sampled
            training points (12,544 / 3 / 0.75 / zeros).
    """

    def __init__(
        self,
        matcher: SplitMatcher,
        focal_weight: float = 2.0,
        iou_weight: float = 5.0,
        dice_weight: float = 5.0,
        bce_weight: float = 0.0,
        cos_weight: float = 1.0,
        focal_alpha: Optional[float] = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.focal_weight, self.iou_weight, self.dice_weight = focal_weight, iou_weight, dice_weight
        self.bce_weight, self.cos_weight = bce_weight, cos_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio
        self.padding_mode = check_padding_mode(padding_mode, "method.criterion.padding_mode")

    @staticmethod
    def num_masks(targets: Targets, device) -> float:
        """Target segments per process, averaged over DDP ranks (at least 1), as Mask2Former normalises."""
        count = torch.tensor(float(sum(len(c) for c in targets.classes)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)

    def layer_losses(
        self, class_logits: Tensor, column_valid: Tensor, prediction: SemanticPrediction, class_embeddings: Tensor,
        targets: Targets, matches: list[tuple[Tensor, Tensor]], num_masks: float,
    ) -> dict[str, Tensor]:  # fmt: skip
        """The terms of one prediction given its assignment ``matches``."""
        losses: dict[str, Tensor] = {}
        focal_targets = torch.zeros_like(class_logits)
        for b, (rows, cols) in enumerate(matches):
            focal_targets[b, rows, targets.classes[b][cols]] = 1.0
        weight = column_valid.unsqueeze(1).to(class_logits.dtype)
        losses["focal"] = self.focal_weight * sigmoid_focal_loss(
            class_logits, focal_targets, self.focal_alpha, self.focal_gamma, weight, num_masks
        )
        mask_logits = prediction.mask_logits
        predicted = torch.cat([mask_logits[b, rows] for b, (rows, _) in enumerate(matches)])
        if len(predicted) == 0:
            zero = mask_logits.sum() * 0.0
            losses.update(iou=zero, dice=zero)
            if self.bce_weight:
                losses["bce"] = zero
        else:
            wanted = torch.cat([targets.masks[b][cols] for b, (_, cols) in enumerate(matches)])
            with torch.no_grad():
                coords = uncertain_point_coords(
                    predicted.float(), self.num_points, self.oversample_ratio, self.importance_ratio, self.padding_mode
                )
                point_targets = point_sample(wanted.unsqueeze(1).float(), coords, self.padding_mode).squeeze(1)
            point_logits = point_sample(predicted.unsqueeze(1).float(), coords, self.padding_mode).squeeze(1)
            losses["iou"] = self.iou_weight * soft_iou_loss(point_logits, point_targets).sum() / num_masks
            losses["dice"] = self.dice_weight * mask_dice_loss(point_logits, point_targets).sum() / num_masks
            if self.bce_weight:
                bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1)
                losses["bce"] = self.bce_weight * bce.sum() / num_masks
        # L_cos over the matched candidate queries, against their segment's candidate embedding (column of E)
        vectors, anchors = [], []
        for b, (rows, cols) in enumerate(matches):
            candidate = targets.groups[b][cols] == CANDIDATE
            vectors.append(prediction.embeddings[b, rows[candidate]])
            anchors.append(class_embeddings[b, targets.classes[b][cols[candidate]]])
        losses["cos"] = self.cos_weight * candidate_cosine_loss(torch.cat(vectors), torch.cat(anchors))
        return losses

    def forward(
        self, predictions: Sequence[SemanticPrediction], class_embeddings: Tensor, column_valid: Tensor,
        targets: Targets, query_groups: Tensor, logits_fn,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Terms summed over ``predictions``. ``class_embeddings (B, N, C)`` is E per image with
        ``column_valid (B, N)``; ``logits_fn(V, E)`` gives the logits of S."""
        num_masks = self.num_masks(targets, predictions[-1].mask_logits.device)
        totals: dict[str, Tensor] = {}
        for prediction in predictions:
            class_logits = logits_fn(prediction.embeddings, class_embeddings)
            matches = self.matcher(class_logits.detach(), prediction.mask_logits, targets, query_groups)
            layer = self.layer_losses(class_logits, column_valid, prediction, class_embeddings, targets, matches, num_masks)
            for name, value in layer.items():
                totals[name] = totals.get(name, 0.0) + value
        return totals


# -- the method ----------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Candidate embeddings C_u of a batch, padded: ``embeddings (B, R, C)``, their region's label value in
    the pseudo-label map ``labels (B, R)`` (``-1`` padding) and ``valid (B, R)``."""

    embeddings: Tensor
    labels: Tensor
    valid: Tensor


class SplitMatching(ZSSMethod):
    """Split Matching (see the module docstring for the paper mapping).

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone` with at least two levels.
        segmenter: keyword arguments of :class:`SplitSegmenter` / ``QuerySegmenter`` (sizes, decoder
            choices); ``num_queries`` is K_s, the seen queries (100, METHODS.md).
        candidate_queries: K_u (50, METHODS.md; the paper gives no count).
        random_queries: K_r, randomly initialised queries added at inference (50, Implementation
            Details; 0 = Table 2's rows without RQ).
        random_query_seed: seed of the random queries; random_query_refresh: draw fresh ones at every
            inference call (a stream seeded once) instead of the same ones every time.
        similarity: ``cosine`` (default: ``cos(V, E) / temperature``) or ``dot`` (the paper's bare V·Eᵀ);
            temperature: 0.07 (CLIP's; not given); logit_bias: added to the logits of S (0; not given).
        candidate_embedding: ``cls_tokens`` (C_u, the paper's, Table 3 best), ``features`` (region means of
            the MFE's F_u) or ``features_mlp`` (those through a 2-layer MLP) — Table 3's rows; the last two
            need ``mfe``.
        mfe: train with the Multi-scale Feature Enhancement and L_MFE (Table 2's "+ MFE").
        mfe_norm: ``gn`` | ``bn`` | ``none`` (Table 4); mfe_weights: ``{ce, focal}`` of L_MFE (1 and 1;
            not given); mfe_focal_gamma: 2.
        matcher: keyword arguments of :class:`SplitMatcher` (costs 2 / 5 / 5, points, padding).
        criterion: keyword arguments of :class:`SplitCriterion` (weights, focal α/γ, points).
        pseudo_masks: keyword arguments of :func:`~zeroseg.toolkit.generate_pseudo_masks` (METHODS.md
            defaults: windows {3, 7}, 10 iterations, λ 0.9, cosine, no singletons).
        region_encoder / crop_size / region_from_layer / max_regions_per_forward: the CLS-token encoder of
            :func:`~zeroseg.toolkit.encode_regions` (``masked_image``, the literal X_m of Sec. 3.2).
        inference_order: ``upsample_first`` (Mask2Former) or ``score_first``, as ``query_baseline``.
        inference_queries: query groups used at inference (all three by default; a subset draws e.g. the
            candidate queries alone, Fig. 5).
        input_scale: images resized by this factor before the backbone (the toy setting's ×1.5), as
            ``query_baseline``.
    """

    def __init__(
        self,
        backbone: Backbone,
        segmenter: Optional[Mapping[str, Any]] = None,
        candidate_queries: int = 50,
        random_queries: int = 50,
        random_query_seed: int = 0,
        random_query_refresh: bool = False,
        similarity: Literal["cosine", "dot"] = "cosine",
        temperature: float = 0.07,
        logit_bias: float = 0.0,
        candidate_embedding: str = "cls_tokens",
        mfe: bool = True,
        mfe_norm: str = "gn",
        mfe_weights: Optional[Mapping[str, float]] = None,
        mfe_focal_gamma: float = 2.0,
        matcher: Optional[Mapping[str, Any]] = None,
        criterion: Optional[Mapping[str, Any]] = None,
        pseudo_masks: Optional[Mapping[str, Any]] = None,
        region_encoder: str = "masked_image",
        crop_size: int = 224,
        region_from_layer: int = -4,
        max_regions_per_forward: int = 64,
        inference_order: InferenceOrder = "upsample_first",
        inference_queries: Sequence[str] = ("seen", "candidate", "random"),
        input_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not input_scale > 0:
            raise ValueError(f"method.input_scale={input_scale!r}: expected a positive factor (1 = images as given)")
        if inference_order not in INFERENCE_ORDERS:
            raise ValueError(f"method.inference_order={inference_order!r} is not one of {list(INFERENCE_ORDERS)}")
        if random_queries < 0:
            raise ValueError(f"method.random_queries must be >= 0, got {random_queries}")
        self.similarity = _check(similarity, SIMILARITIES, "similarity")
        self.candidate_embedding = _check(candidate_embedding, CANDIDATE_EMBEDDINGS, "candidate_embedding")
        if candidate_embedding != "cls_tokens" and not mfe:
            raise ValueError(f"method.candidate_embedding={candidate_embedding} takes C_u from the MFE's F_u: it needs method.mfe=true")
        unknown = [g for g in inference_queries if g not in QUERY_GROUPS]
        if unknown or not inference_queries:
            raise ValueError(f"method.inference_queries={list(inference_queries)} must be a non-empty subset of {list(QUERY_GROUPS)}")
        self.inference_queries = tuple(inference_queries)
        self.input_scale, self.inference_order = float(input_scale), inference_order
        self.temperature, self.logit_bias = temperature, logit_bias
        self.num_random_queries, self.random_query_seed = random_queries, random_query_seed
        self.random_query_refresh = random_query_refresh
        self._random_query_stream: Optional[torch.Generator] = None
        self.backbone = backbone
        joint_dim = self.teacher.embed_dim
        options = dict(segmenter or {})
        self.segmenter = SplitSegmenter(
            list(backbone.channels), list(backbone.strides), joint_dim, candidate_queries=candidate_queries, **options
        )
        self.criterion = SplitCriterion(SplitMatcher(**dict(matcher or {})), **dict(criterion or {}))
        self.use_mfe = mfe
        self.mfe_weights = {"ce": 1.0, "focal": 1.0, **(mfe_weights or {})}
        self.mfe_focal_gamma = mfe_focal_gamma
        if mfe:
            conv_dim = options.get("conv_dim") or options.get("dim", 256)  # the pixel decoder's width
            self.mfe = MultiScaleFeatureEnhancement(conv_dim, joint_dim, norm=mfe_norm)
        if candidate_embedding == "features_mlp":
            self.candidate_mlp = nn.Sequential(nn.Linear(joint_dim, joint_dim), nn.ReLU(inplace=True), nn.Linear(joint_dim, joint_dim))
        self.pseudo_mask_options = dict(pseudo_masks or {})
        self.region_encoder, self.crop_size, self.region_from_layer = region_encoder, crop_size, region_from_layer
        self.max_regions_per_forward = max_regions_per_forward

    # -- shared ----------------------------------------------------------------------------------------
    def class_logits(self, embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
        """Logits of S for semantic vectors ``(B, Q, C)`` against ``(N, C)`` or ``(B, N, C)``."""
        return class_similarity_logits(embeddings, class_embeddings, self.similarity, self.temperature, self.logit_bias)

    def _scaled(self, images: Tensor) -> Tensor:
        if self.input_scale == 1.0:
            return images
        return F.interpolate(images, scale_factor=self.input_scale, mode="bilinear", align_corners=False)

    # -- inference (Sec. 3.4) -------------------------------------------------------------------------
    def random_queries(self, device=None) -> tuple[Tensor, Tensor]:
        """The K_r random queries ``(features, positions)``, each ``(K_r, dim)`` ~ N(0, 1): drawn on the CPU
        from ``random_query_seed`` (identical on every call and device), or from a stream seeded once when
        ``random_query_refresh``."""
        if self.random_query_refresh:
            if self._random_query_stream is None:
                self._random_query_stream = torch.Generator().manual_seed(self.random_query_seed)
            generator = self._random_query_stream
        else:
            generator = torch.Generator().manual_seed(self.random_query_seed)
        shape = (self.num_random_queries, self.segmenter.query_dim)
        features, positions = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        return features.to(device), positions.to(device)

    def query_predictions(self, images: Tensor, random_queries: bool = True) -> tuple[list[SemanticPrediction], Tensor]:
        """Every decoder prediction for ``images`` with the seen and candidate queries (plus the random ones
        if asked and K_r > 0), and the group id of each query (0 seen, 1 candidate, 2 random)."""
        features = self.backbone(self._scaled(images))
        extra = self.num_random_queries if random_queries else 0
        if extra:
            with self.segmenter.extra_queries(*self.random_queries(images.device)):
                predictions, _ = self.segmenter(features)
        else:
            predictions, _ = self.segmenter(features)
        return predictions, self.segmenter.query_groups(extra, images.device)

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """``Σ_q S_q · sigmoid(M_q)`` over the ``inference_queries`` groups at the size of ``images``; the MFE
        is not part of this graph (Sec. 3.4)."""
        predictions, groups = self.query_predictions(images, "random" in self.inference_queries)
        final = predictions[-1]
        keep = torch.isin(groups, torch.tensor([QUERY_GROUPS[g] for g in self.inference_queries], device=groups.device))
        probs = self.class_logits(final.embeddings[:, keep], class_embeddings).sigmoid()
        return sigmoid_semantic_inference(probs, final.mask_logits[:, keep], images.shape[-2:], self.inference_order)

    # -- training (Sec. 3.2-3.3) ---------------------------------------------------------------------
    def candidate_embeddings(self, images: Tensor, candidate_map: Tensor, enhanced: Optional[Tensor]) -> Candidates:
        """C_u of every candidate region of ``candidate_map`` (Y_u; other pixels ignore): the teacher's CLS
        token of the masked image (``cls_tokens``), or the region mean of F_u (``features``, ``features_mlp``
        through the MLP; a region too small to reach F_u's grid is dropped)."""
        if self.candidate_embedding == "cls_tokens":
            regions = encode_regions(
                self.teacher, images, candidate_map, self.region_encoder, self.ignore_index, self.crop_size,
                self.max_regions_per_forward, from_layer=self.region_from_layer,
            )  # fmt: skip
            return Candidates(regions.tokens.float(), regions.labels, regions.valid)
        _, _, _, labels, valid = padded_regions(candidate_map, self.ignore_index)
        grid = F.interpolate(candidate_map.unsqueeze(1).float(), size=enhanced.shape[-2:], mode="nearest").squeeze(1).long()
        means, counts = region_means(enhanced.float(), grid, labels, valid)
        valid = valid & (counts > 0)
        if self.candidate_embedding == "features_mlp":
            means = self.candidate_mlp(means)
        return Candidates(means, labels, valid)

    def mfe_losses(self, enhanced: Tensor, pseudo: Tensor, candidates: Candidates, num_seen: int) -> dict[str, Tensor]:
        """L_MFE = CE + focal of F_u classified against E = cat(A_s, C_u) (cosine / temperature), against
        Y_p at the label resolution (Sec. 3.3)."""
        is_candidate = candidates.valid
        latent = None
        if bool(is_candidate.any()):
            latent = latent_class_embeddings(candidates.embeddings, candidates.labels, is_candidate, num_seen)
        scale = 1.0 / self.temperature
        logits, target = seen_and_latent_logits(
            enhanced.float(), self.train_text_embeddings, pseudo, num_seen, latent, scale, scale, self.ignore_index
        )
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index) if bool((target != self.ignore_index).any()) else logits.sum() * 0.0
        focal = softmax_focal_loss(logits, target, self.ignore_index, self.mfe_focal_gamma)
        return {"mfe_ce": self.mfe_weights["ce"] * ce, "mfe_focal": self.mfe_weights["focal"] * focal}

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        num_seen = len(self.train_text_embeddings)
        with torch.no_grad():
            _, teacher_dense = self.teacher.encode_image(images)
            pseudo = generate_pseudo_masks(teacher_dense, labels, num_seen, self.ignore_index, **self.pseudo_mask_options)
        # Y_u alone: seen pixels become ignore (the ignore value itself is >= num_seen and stays)
        candidate_map = torch.where(pseudo >= num_seen, pseudo, torch.full_like(pseudo, self.ignore_index))
        predictions, multi_scale = self.segmenter(self.backbone(self._scaled(images)))
        enhanced = self.mfe(multi_scale) if self.use_mfe else None
        candidates = self.candidate_embeddings(images, candidate_map, enhanced)
        targets = split_targets(labels, candidate_map, candidates.labels, candidates.valid, num_seen, self.ignore_index)
        batch_size = len(images)
        seen_embeddings = self.train_text_embeddings.float().unsqueeze(0).expand(batch_size, -1, -1)
        class_embeddings = torch.cat([seen_embeddings, candidates.embeddings.float()], dim=1)  # E = cat(A_s, C_u)
        seen_valid = torch.ones(batch_size, num_seen, dtype=torch.bool, device=images.device)
        column_valid = torch.cat([seen_valid, candidates.valid], dim=1)
        losses = self.criterion(
            predictions, class_embeddings, column_valid, targets, self.segmenter.query_groups(0, images.device), self.class_logits
        )
        if enhanced is not None:
            losses.update(self.mfe_losses(enhanced, pseudo, candidates, num_seen))
        losses["loss"] = sum(losses.values())
        return losses
