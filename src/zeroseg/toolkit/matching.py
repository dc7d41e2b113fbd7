"""Set prediction machinery of the query-based stack: point sampling, the Hungarian matcher, the set
criterion and semantic inference (Mask2Former, Cheng et al. 2022, Sec. 3.3 and 4; MaskFormer
Sec. 3.2–3.4).

* :class:`HungarianMatcher`: cost = w_cls·(−p(class)) + w_mask·BCE + w_dice·dice, mask costs on
  one shared set of uniformly sampled points (12,544), computed for the whole batch at once on
  the device (targets padded); one ``scipy.optimize.linear_sum_assignment`` per image (or per
  group of an image: Split Matching pairs seen queries with seen targets and candidate queries
  with candidate targets). A non-finite cost stops with :class:`NonFiniteCostError` naming the
  image and the term.
* :class:`SetCriterion`: CE over K+1 classes with the no-object class down-weighted (0.1); mask BCE
  and dice on importance-sampled points (oversample 3, importance 0.75: the most uncertain
  points plus uniform ones); weights 2 / 5 / 5; summed over every decoder layer.
* :func:`semantic_inference`: ``Σ_q softmax(class)_q[:K] · sigmoid(mask)_q`` per pixel, with the mask
  logits first upsampled to the output size (Mask2Former's order) or the scores resized afterwards.

Point sampling pads like detectron2's ``point_sample`` (``grid_sample``'s zero padding) unless
``padding_mode="border"`` is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from zeroseg.toolkit.set_losses import mask_dice_loss

__all__ = [
    "INFERENCE_ORDERS",
    "PADDING_MODES",
    "HungarianMatcher",
    "NonFiniteCostError",
    "SetCriterion",
    "Targets",
    "check_padding_mode",
    "point_sample",
    "semantic_inference",
    "targets_from_labels",
    "uncertain_point_coords",
]


PaddingMode = Literal["zeros", "border"]
PADDING_MODES: tuple[str, ...] = ("zeros", "border")
InferenceOrder = Literal["upsample_first", "score_first"]
INFERENCE_ORDERS: tuple[str, ...] = ("upsample_first", "score_first")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``key`` and the choices."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {list(choices)}")
    return value


def check_padding_mode(padding_mode: str, key: str = "padding_mode") -> str:
    """``padding_mode`` if it is one of :data:`PADDING_MODES`, else a ``ValueError`` naming ``key``."""
    return _check_choice(padding_mode, PADDING_MODES, key)


class NonFiniteCostError(FloatingPointError):
    """The matching cost of an image has NaN/inf entries (usually diverged predictions)."""


@dataclass
class Targets:
    """Per-image ground-truth segments: ``classes[b] (T_b,)`` and ``masks[b] (T_b, H, W)`` (float 0/1);
    ``groups[b] (T_b,)`` optional group ids for grouped matching."""

    classes: list[Tensor]
    masks: list[Tensor]
    groups: Optional[list[Tensor]] = None
    # per image (H, W) float, 1 where the label is ignore (unseen classes in inductive training, padding)
    ignore: Optional[list[Tensor]] = None


def targets_from_labels(labels: Tensor, ignore_index: int = 255) -> Targets:
    """One segment per class present in each label map ``(B, H, W)`` (ignore pixels belong to none and
    are recorded in ``Targets.ignore``)."""
    classes, masks = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[present != ignore_index]
        classes.append(present)
        masks.append((label.unsqueeze(0) == present.view(-1, 1, 1)).float())
    return Targets(classes, masks, ignore=[(label == ignore_index).float() for label in labels])


IgnorePixels = Literal["background", "exclude"]
IGNORE_PIXELS: tuple[str, ...] = ("background", "exclude")


def check_ignore_pixels(ignore_pixels: str, key: str) -> str:
    """``ignore_pixels`` if it is one of :data:`IGNORE_PIXELS`, else a ``ValueError`` naming ``key``."""
    return _check_choice(ignore_pixels, IGNORE_PIXELS, key)


def _point_validity(targets: Targets, image_index: Tensor, coords: Tensor, padding_mode: PaddingMode) -> Tensor:
    """``(N, P)`` weights: 1 at points whose label is not ignore (bilinear, so 0–1 at ignore borders)."""
    if targets.ignore is None:
        raise ValueError("ignore_pixels='exclude' needs Targets.ignore (targets_from_labels records it)")
    ignore = torch.stack([targets.ignore[int(b)] for b in image_index]).unsqueeze(1).float()
    return 1.0 - point_sample(ignore, coords, padding_mode).squeeze(1)


def point_sample(inputs: Tensor, coords: Tensor, padding_mode: PaddingMode = "zeros") -> Tensor:
    """Bilinear values of ``inputs (N, C, H, W)`` at ``coords (N, P, 2)`` in [0, 1] (x, y) → ``(N, C, P)``.

    ``padding_mode="zeros"`` (default) is detectron2's ``point_sample`` (``grid_sample`` with its default
    zero padding, ``align_corners=False``), which Mask2Former's matcher and criterion use: a point within
    half a pixel of the edge blends the edge value with zeros. ``"border"`` takes the edge value there
    instead (masks touching the image border are not diluted).
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).squeeze(3)


def uncertain_point_coords(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float, padding_mode: PaddingMode = "zeros"
) -> Tensor:
    """Mask2Former's training points ``(N, P, 2)`` (detectron2's ``get_uncertain_point_coords_with_randomness``):
    of ``oversample_ratio·P`` uniform candidates keep the ``importance_ratio·P`` most uncertain (|logit|
    smallest), fill the rest uniformly."""
    count = mask_logits.shape[0]
    candidates = torch.rand(count, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits.unsqueeze(1), candidates, padding_mode).squeeze(1).abs()
    important = int(importance_ratio * num_points)
    index = uncertainty.topk(important, dim=1).indices
    coords = torch.gather(candidates, 1, index.unsqueeze(-1).expand(-1, -1, 2))
    if num_points > important:
        coords = torch.cat([coords, torch.rand(count, num_points - important, 2, device=mask_logits.device)], dim=1)
    return coords


def _bce_cost(logits: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean BCE over points of every (prediction, target) pair: ``(..., Q, P), (..., T, P) → (..., Q, T)``.

    ``BCE(x, t) = softplus(x) − x·t``, so the pair matrix is one row sum and one matmul. ``valid
    (..., 1, P)`` weights the points (the mean is over the valid ones).
    """
    if valid is None:
        return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.transpose(-1, -2)) / logits.shape[-1]
    weighted = logits * valid
    total = (F.softplus(logits) * valid).sum(-1, keepdim=True) - weighted @ targets.transpose(-1, -2)
    return total / valid.sum(-1, keepdim=True).clamp_min(1e-6)


def _dice_cost(logits: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    probs = logits.sigmoid() if valid is None else logits.sigmoid() * valid
    numerator = 2 * probs @ targets.transpose(-1, -2)
    denominator = probs.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2)
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Bipartite matching of queries to target segments.

    Args:
        cost_class / cost_mask / cost_dice: weights of the three terms (2 / 5 / 5, Mask2Former).
        num_points: uniformly sampled points shared by predictions and targets (12,544).
        padding_mode: point sampling at the border, ``zeros`` (detectron2's) or ``border``.
        ignore_pixels: ``background`` (Mask2Former: an ignore pixel is outside every target mask) or
            ``exclude`` (points on ignore pixels do not count in the mask costs).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        padding_mode: PaddingMode = "zeros",
        ignore_pixels: IgnorePixels = "background",
    ) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points
        self.padding_mode = check_padding_mode(padding_mode, "method.matcher.padding_mode")
        self.ignore_pixels = check_ignore_pixels(ignore_pixels, "method.matcher.ignore_pixels")

    @torch.no_grad()
    def cost_terms(self, class_logits: Optional[Tensor], mask_logits: Tensor, targets: Targets) -> dict[str, Tensor]:
        """Unweighted cost terms ``(B, Q, T_max)`` for the batch (padded target columns are 0)."""
        batch, queries = mask_logits.shape[:2]
        t_max = max(max((len(c) for c in targets.classes), default=0), 1)
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        predicted = point_sample(mask_logits.float(), coords.expand(batch, -1, -1), self.padding_mode)  # (B, Q, P)
        # targets are sampled image by image (they differ in count) and padded at point level:
        # padding full-resolution masks would copy B·T·H·W values
        wanted = predicted.new_zeros(batch, t_max, self.num_points)
        labels = torch.zeros(batch, t_max, dtype=torch.long, device=mask_logits.device)
        for b, (classes, masks) in enumerate(zip(targets.classes, targets.masks)):
            if len(classes):
                wanted[b, : len(classes)] = point_sample(masks.unsqueeze(0).float(), coords, self.padding_mode)[0]
                labels[b, : len(classes)] = classes
        valid = None
        if self.ignore_pixels == "exclude":
            image_index = torch.arange(batch, device=mask_logits.device)
            valid = _point_validity(targets, image_index, coords.expand(batch, -1, -1), self.padding_mode).unsqueeze(1)
        terms = {"mask": _bce_cost(predicted, wanted, valid), "dice": _dice_cost(predicted, wanted, valid)}
        if class_logits is not None:
            probs = class_logits.float().softmax(-1)
            terms["class"] = -torch.gather(probs, 2, labels.unsqueeze(1).expand(-1, queries, -1))
        return terms

    @torch.no_grad()
    def forward(
        self, class_logits: Optional[Tensor], mask_logits: Tensor, targets: Targets, query_groups: Optional[Tensor] = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(query indices, target indices)`` of the optimal assignment.

        ``query_groups (Q,)`` with ``targets.groups`` restricts matching to pairs of the same group.
        """
        terms = self.cost_terms(class_logits, mask_logits, targets)
        weights = {"class": self.cost_class, "mask": self.cost_mask, "dice": self.cost_dice}
        total = sum(weights[k] * v for k, v in terms.items())
        counts = torch.tensor([len(c) for c in targets.classes], device=total.device)
        real = torch.arange(total.shape[-1], device=total.device) < counts.view(-1, 1, 1)  # (B, 1, T): not padding
        # one device sync for the whole batch; only a failure looks for the image and term
        if not bool(torch.isfinite(total).logical_or(~real).all()):
            for name, term in terms.items():
                bad = (~torch.isfinite(term) & real).flatten(1).sum(1)
                if bool(bad.any()):
                    b = int(torch.nonzero(bad)[0])
                    raise NonFiniteCostError(
                        f"matcher: image {b} of the batch has {int(bad[b])} non-finite values in the '{name}' cost "
                        "(predictions diverged: check the learning rate, mixed precision and the input)"
                    )
        total = total.cpu().numpy()  # one transfer; the assignments run on the CPU
        matches = []
        for b, classes in enumerate(targets.classes):
            groups = None if targets.groups is None else targets.groups[b]
            matches.append(self._assign(total[b, :, : len(classes)], query_groups, groups, mask_logits.device))
        return matches

    @staticmethod
    def _assign(
        cost: np.ndarray, query_groups: Optional[Tensor], target_groups: Optional[Tensor], device
    ) -> tuple[Tensor, Tensor]:
        if query_groups is None or target_groups is None:
            rows, cols = linear_sum_assignment(cost)
        else:
            q_groups, t_groups = query_groups.cpu().numpy(), target_groups.cpu().numpy()
            rows_list, cols_list = [], []
            for group in np.unique(t_groups):
                q_index, t_index = np.flatnonzero(q_groups == group), np.flatnonzero(t_groups == group)
                r, c = linear_sum_assignment(cost[np.ix_(q_index, t_index)])
                rows_list.append(q_index[r])
                cols_list.append(t_index[c])
            rows = np.concatenate(rows_list) if rows_list else np.zeros(0, dtype=np.int64)
            cols = np.concatenate(cols_list) if cols_list else np.zeros(0, dtype=np.int64)
            order = np.argsort(rows)
            rows, cols = rows[order], cols[order]
        return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


def _mask_losses(logits: Tensor, targets: Tensor, num_masks: float, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """BCE (mean over points) and dice of matched point logits ``(N, P)``, summed over masks / num_masks;
    ``valid (N, P)`` weights the points (the mean is over the valid ones)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if valid is None:
        bce = bce.mean(1).sum() / num_masks
    else:
        bce = ((bce * valid).sum(1) / valid.sum(1).clamp_min(1e-6)).sum() / num_masks
    return bce, mask_dice_loss(logits, targets, valid=valid).sum() / num_masks


class SetCriterion(nn.Module):
    """Mask2Former's loss for one or more decoder predictions.

    Args:
        num_classes: K (the no-object class is K; for ``objectness`` heads K = 1).
        matcher: the :class:`HungarianMatcher`.
        class_weight / mask_weight / dice_weight: 2 / 5 / 5.
        no_object_weight: CE weight of the no-object class (0.1).
        num_points / oversample_ratio / importance_ratio: training points (12,544 / 3 / 0.75).
        padding_mode: point sampling at the border, ``zeros`` (detectron2's) or ``border``.
        ignore_pixels: ``background`` (Mask2Former's semantic targets: an ignore pixel is outside every
            mask, so unseen regions of inductive training are taught as no segment) or ``exclude``
            (points on ignore pixels leave the mask losses, as ignore pixels leave a per-pixel CE).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        padding_mode: PaddingMode = "zeros",
        ignore_pixels: IgnorePixels = "background",
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.padding_mode = check_padding_mode(padding_mode, "method.criterion.padding_mode")
        self.ignore_pixels = check_ignore_pixels(ignore_pixels, "method.criterion.ignore_pixels")
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.no_object_weight = no_object_weight
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio

    def num_masks(self, targets: Targets, device) -> float:
        """Target segments per process, averaged over DDP ranks (at least 1)."""
        count = torch.tensor(float(sum(len(c) for c in targets.classes)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)

    def layer_losses(
        self, class_logits: Optional[Tensor], mask_logits: Tensor, targets: Targets, matches, num_masks: float
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if class_logits is not None:
            num_classes = class_logits.shape[-1] - 1
            target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.long, device=class_logits.device)
            for b, (rows, cols) in enumerate(matches):
                target_classes[b, rows] = targets.classes[b][cols]
            weight = torch.ones(num_classes + 1, device=class_logits.device)
            weight[-1] = self.no_object_weight
            losses["class"] = self.class_weight * F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight)
        predicted = torch.cat([mask_logits[b, rows] for b, (rows, _) in enumerate(matches)])
        wanted = torch.cat([targets.masks[b][cols] for b, (_, cols) in enumerate(matches)]).to(predicted.dtype)
        if len(predicted) == 0:
            zero = mask_logits.sum() * 0.0
            losses["mask"], losses["dice"] = zero, zero
            return losses
        with torch.no_grad():
            coords = uncertain_point_coords(
                predicted.float(), self.num_points, self.oversample_ratio, self.importance_ratio, self.padding_mode
            )
            point_targets = point_sample(wanted.unsqueeze(1).float(), coords, self.padding_mode).squeeze(1)
            valid = None
            if self.ignore_pixels == "exclude":
                image_index = torch.cat([torch.full((len(rows),), b) for b, (rows, _) in enumerate(matches)])
                valid = _point_validity(targets, image_index, coords, self.padding_mode)
        point_logits = point_sample(predicted.unsqueeze(1).float(), coords, self.padding_mode).squeeze(1)
        bce, dice = _mask_losses(point_logits, point_targets, num_masks, valid)
        losses["mask"], losses["dice"] = self.mask_weight * bce, self.dice_weight * dice
        return losses

    def forward(self, predictions: Sequence, targets: Targets, query_groups: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Loss terms of every prediction (deep supervision): ``{"class", "mask", "dice"}`` summed
        over layers, plus ``"loss"`` (their sum). ``predictions`` are :class:`QueryPrediction`-like."""
        num_masks = self.num_masks(targets, predictions[-1].mask_logits.device)
        totals: dict[str, Tensor] = {}
        for prediction in predictions:
            matches = self.matcher(prediction.class_logits, prediction.mask_logits, targets, query_groups)
            for name, value in self.layer_losses(
                prediction.class_logits, prediction.mask_logits, targets, matches, num_masks
            ).items():
                totals[name] = totals.get(name, 0.0) + value
        totals["loss"] = sum(totals.values())
        return totals


def semantic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    size: Optional[Sequence[int]] = None,
    order: InferenceOrder = "upsample_first",
) -> Tensor:
    """Per-pixel class scores ``(B, K, H, W) = Σ_q softmax(class)_q[:K] · sigmoid(mask)_q`` (no object dropped).

    ``size`` (optional) is the output ``(H, W)``; ``order`` says where the resizing happens:

    * ``upsample_first`` (Mask2Former's ``MaskFormer.forward``/``semantic_inference``): the mask logits
      ``(B, Q, h, w)`` are upsampled to ``size`` (bilinear, ``align_corners=False``), then the sigmoid
      and the sum over queries are taken at full resolution;
    * ``score_first``: the sum is taken at the mask resolution and the class scores are resized.

    Without ``size`` the scores stay at the mask resolution (both orders coincide).
    """
    if order not in INFERENCE_ORDERS:
        raise ValueError(f"inference_order={order!r} is not one of {list(INFERENCE_ORDERS)}")
    resize = size is not None and tuple(size) != tuple(mask_logits.shape[-2:])
    if resize and order == "upsample_first":
        mask_logits = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    scores = torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
    if resize and order == "score_first":
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return scores
