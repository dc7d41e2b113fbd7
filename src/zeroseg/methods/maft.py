"""``method=maft``: Mask-Aware Fine-Tuning of CLIP (Jiao et al., "Learning Mask-aware CLIP Representations for
Zero-Shot Segmentation", NeurIPS 2023; maft.txt Secs. 3–4 and App. A).

Stage 1 (another run, ``experiment=maft_stage1_<dataset>`` = ``method=query_baseline``): a "frozen CLIP"
proposal model — Mask2Former with a text classifier — giving ``N`` mask proposals ``M`` and their seen-class
scores ``A^p``. Stage 2 (this method) loads it frozen (``method.proposals.ckpt_path``) and fine-tunes the
Image-Proposal CLIP encoder (:class:`~zeroseg.models.ip_clip.IPCLIP`, Sec. 4.1, Eqs. 2–4), a trainable copy of
the teacher's visual tower that embeds all ``N`` proposals in one pass, with

* the mask-aware loss (Sec. 4.2): ``S_IoU (K × N)`` between every ground-truth class mask of an image and every
  proposal, min-max normalised per class over the proposals (Eq. 5); ``L_ma = SmoothL1(A^c_select,
  S_IoU^norm)`` (Eqs. 6–7), ``A^c_select`` the IP-CLIP scores (Eq. 1: softmax over the seen classes of the
  cosine similarities / τ) of the image's ground-truth classes; L1, L2 and KL variants for Table 4b;
* the self-distillation loss ``L_dis = SmoothL1(A_S, A_T)`` (Eq. 8): the scores of IP-CLIP without masks
  (its ordinary CLS) against those of the frozen teacher, which is a separate, unchanged copy;
* ``L = L_ma + λ·L_dis`` (λ = 1 in the paper, 0.1 in the public code).

Inference (App. A, Eq. 9): ``O = Âᵀ·M`` with ``Â = A^p^λ·A^c^(1−λ)`` on seen classes and ``A^c^λ`` on unseen
ones (λ = 0.7), or the IP-CLIP scores alone (``ensemble: none``, Table 2 / the Table 4 ablations).

Zero-shot protocol: training sees the seen classes' names and labels only (unseen pixels are ignore, so they
belong to no ground-truth class mask); the proposal model's ``A^p`` is computed against whatever class
embeddings it is given (the seen ones in training, all at test).

Choices where the paper is silent (config values; defaults follow the public code where it exists):

* ``iou: soft`` — ``S_IoU`` of the proposals' probabilities (public code) or ``binary`` (thresholded at 0.5);
  proposals are upsampled (bilinear) to the label size first; ``iou_ignore: include`` counts ignore pixels in
  the proposals' area (public code), ``exclude`` leaves them out;
* ``temperature: null`` — τ of Eq. 1 is the teacher's own learned temperature (1/100 for OpenAI's CLIP, the
  public code's logit scale 100);
* the KL variant of L_ma normalises each ground-truth class's row of ``S_IoU^norm`` and of ``A^c_select`` over
  the proposals into distributions, ``KL(S ‖ A)``, averaged over rows;
* ``ensemble: eq9`` (the paper); ``public`` is the public code's variant (unseen ``A^p^(1−λ)·A^c^λ``);
* the trained IP-CLIP is exported at the end of training as a CLIP checkpoint (``export_path``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.ip_clip import IPCLIP
from zeroseg.models.proposals import load_proposal_model

log = logging.getLogger(__name__)

__all__ = [
    "MAFT",
    "distillation_loss",
    "ensemble_scores",
    "mask_aware_loss",
    "min_max_normalise",
    "proposal_class_iou",
]

MaskAwareLoss = Literal["smooth_l1", "l1", "l2", "kl"]
MASK_AWARE_LOSSES: tuple[str, ...] = ("smooth_l1", "l1", "l2", "kl")
ENSEMBLES: tuple[str, ...] = ("eq9", "public", "none")
IOU_MODES: tuple[str, ...] = ("soft", "binary")
IOU_IGNORE: tuple[str, ...] = ("include", "exclude")
# the run that produces the stage-1 checkpoint, per dataset (named in errors)
STAGE1_EXPERIMENTS = {"voc": "maft_stage1_voc", "coco_stuff": "maft_stage1_coco_stuff"}
EPS = 1e-8  # the public code's min-max and IoU epsilon


def _choice(value: str, choices: Sequence[str], key: str) -> str:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {list(choices)}")
    return value


# -- Sec. 4.2: the losses ------------------------------------------------------------------------------------------


def proposal_class_iou(
    mask_logits: Tensor,
    labels: Tensor,
    ignore_index: int = 255,
    mode: str = "soft",
    ignore: str = "include",
) -> tuple[Tensor, Tensor, Tensor]:
    """``S_IoU`` between every proposal and every ground-truth class mask of each image (Eq. 5's input).

    Args:
        mask_logits: proposals ``(B, N, h, w)`` (logits, any resolution; upsampled bilinearly to the labels).
        labels: ``(B, H, W)`` training ids, ``ignore_index`` = no class.
        mode: ``soft`` (IoU of the sigmoid probabilities: ``Σ p·g / (Σ p + Σ g − Σ p·g)``) or ``binary``
            (probabilities thresholded at 0.5).
        ignore: ``include`` (a proposal's area counts every pixel) or ``exclude`` (ignore pixels leave the sums).

    Returns:
        ``iou (G, N)``, ``image_index (G,)`` and ``class_id (G,)``: one row per (image, class present) pair,
        sorted by image then class.
    """
    _choice(mode, IOU_MODES, "method.iou")
    _choice(ignore, IOU_IGNORE, "method.iou_ignore")
    if mask_logits.dim() != 4 or labels.dim() != 3 or mask_logits.shape[0] != labels.shape[0]:
        raise ValueError(
            "proposal_class_iou: expected masks (B, N, h, w) and labels (B, H, W), "
            f"got {tuple(mask_logits.shape)} and {tuple(labels.shape)}"
        )
    if mask_logits.shape[-2:] != labels.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    probabilities = mask_logits.float().sigmoid()
    if mode == "binary":
        probabilities = (probabilities >= 0.5).float()
    if ignore == "exclude":
        probabilities = probabilities * (labels != ignore_index).unsqueeze(1).float()
    image_index, class_id = _present_classes(labels, ignore_index)
    if not len(image_index):
        return probabilities.new_zeros(0, probabilities.shape[1]), image_index, class_id
    targets = (labels[image_index] == class_id.view(-1, 1, 1)).float().flatten(1)  # (G, P)
    predicted = probabilities[image_index].flatten(2)  # (G, N, P)
    intersection = torch.einsum("gnp,gp->gn", predicted, targets)
    union = predicted.sum(-1) + targets.sum(-1, keepdim=True) - intersection
    return intersection / (union + EPS), image_index, class_id


def _present_classes(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1).long()
    valid = flat != ignore_index
    if not bool(valid.any()):
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty
    num_values = int(flat[valid].max()) + 1
    keys = torch.arange(batch, device=labels.device).unsqueeze(1) * num_values + flat.clamp(max=num_values - 1)
    counts = torch.bincount(keys[valid], minlength=batch * num_values).view(batch, num_values)
    return torch.nonzero(counts > 0, as_tuple=True)


def min_max_normalise(iou: Tensor) -> Tensor:
    """Eq. 5 per row (one ground-truth class of one image, over the N proposals):
    ``(S − min S) / (max S − min S + ε)`` (ε = 1e-8, public code)."""
    low = iou.min(dim=-1, keepdim=True).values
    high = iou.max(dim=-1, keepdim=True).values
    return (iou - low) / (high - low + EPS)


def mask_aware_loss(selected_scores: Tensor, normalised_iou: Tensor, kind: str = "smooth_l1") -> Tensor:
    """``L_ma`` (Eq. 6) between ``A^c_select (G, N)`` and ``S_IoU^norm (G, N)``, averaged over the elements.

    ``smooth_l1``: Eq. 7 (β = 1); ``l1``; ``l2`` (squared error); ``kl``: each row of both normalised over the
    proposals into a distribution, ``KL(S ‖ A)`` summed over the proposals and averaged over rows (Table 4b's
    variants; the paper does not define its KL, this is zeroseg's reading). Zero (with a graph) without rows.
    """
    _choice(kind, MASK_AWARE_LOSSES, "method.mask_aware_loss")
    if selected_scores.shape != normalised_iou.shape:
        raise ValueError(f"mask_aware_loss: scores {tuple(selected_scores.shape)} vs IoU {tuple(normalised_iou.shape)}")
    if selected_scores.numel() == 0:
        return selected_scores.sum() * 0.0
    target = normalised_iou.detach().to(selected_scores.dtype)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(selected_scores, target, beta=1.0)
    if kind == "l1":
        return F.l1_loss(selected_scores, target)
    if kind == "l2":
        return F.mse_loss(selected_scores, target)
    target_distribution = target / (target.sum(-1, keepdim=True) + EPS)
    log_scores = torch.log(selected_scores / (selected_scores.sum(-1, keepdim=True) + EPS) + EPS)
    return F.kl_div(log_scores, target_distribution, reduction="sum") / selected_scores.shape[0]


def distillation_loss(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """``L_dis = SmoothL1(A_S, A_T)`` (Eq. 8): class scores of IP-CLIP without masks vs the frozen teacher."""
    return F.smooth_l1_loss(student_scores, teacher_scores.detach(), beta=1.0)


# -- App. A: the ensemble --------------------------------------------------------------------------------------------


def ensemble_scores(
    proposal_scores: Optional[Tensor], clip_scores: Tensor, seen: Tensor, weight: float = 0.7, kind: str = "eq9"
) -> Tensor:
    """``Â (B, N, C)`` of Eq. 9 from ``A^p`` and ``A^c`` (both ``(B, N, C)`` probabilities); ``seen (C,)`` bool.

    ``eq9``: seen ``A^p^λ · A^c^(1−λ)``, unseen ``A^c^λ``; ``public`` (the public code): unseen
    ``A^p^(1−λ) · A^c^λ``; ``none``: ``A^c`` (Table 2, without the ensemble).
    """
    _choice(kind, ENSEMBLES, "method.ensemble")
    if kind == "none":
        return clip_scores
    if proposal_scores is None:
        raise ValueError(f"method.ensemble={kind!r} needs the proposal model's class scores A^p (class_head 'text')")
    seen = seen.to(clip_scores.device).view(1, 1, -1)
    seen_part = proposal_scores.pow(weight) * clip_scores.pow(1.0 - weight)
    unseen_part = clip_scores.pow(weight)
    if kind == "public":
        unseen_part = unseen_part * proposal_scores.pow(1.0 - weight)
    return torch.where(seen, seen_part, unseen_part)


# -- the method -------------------------------------------------------------------------------------------------------


class MAFT(ZSSMethod):
    """MAFT stage 2: fine-tune IP-CLIP on a frozen stage-1 proposal model; classify its proposals at test.

    Args:
        proposals: ``{ckpt_path: <stage-1 checkpoint>}`` — a ``method=query_baseline`` run (``experiment=
            maft_stage1_<dataset>``; any backbone + QuerySegmenter checkpoint with a ``text`` class head).
        ip_clip: keyword arguments of :class:`~zeroseg.models.ip_clip.IPCLIP` (``from_layer``, ``reference_depth``,
            ``frozen_units``, ``mask_threshold``).
        clip_input_size: IP-CLIP's input ``[H, W]`` or one side (the paper: 480); ``None`` = the images as given.
        temperature: τ of Eq. 1; ``None`` = the teacher's learned temperature (OpenAI CLIP: 0.01, public code).
        mask_aware_loss: ``smooth_l1`` (Eq. 6, default) | ``l1`` | ``l2`` | ``kl`` (Table 4b).
        mask_aware_weight: weight of L_ma (0 removes it; Table 4a's rows).
        distillation_weight: λ of ``L = L_ma + λ·L_dis`` (1 in the paper, 0.1 in the public code; 0 removes L_dis).
        iou / iou_ignore: how ``S_IoU`` is measured (see :func:`proposal_class_iou`).
        ensemble: ``eq9`` (default) | ``public`` | ``none`` (Table 2); ensemble_weight: λ of Eq. 9 (0.7).
        export_path: where the fine-tuned CLIP is written at the end of training (``.safetensors`` / ``.pt``);
            ``None`` = not exported.
        backbone: accepted and unused (the proposal model brings its own).
        **kwargs: see :class:`~zeroseg.methods.base.ZSSMethod`.
    """

    def __init__(
        self,
        proposals: Optional[Mapping[str, Any]] = None,
        ip_clip: Optional[Mapping[str, Any]] = None,
        clip_input_size: Optional[Union[int, Sequence[int]]] = None,
        temperature: Optional[float] = None,
        mask_aware_loss: MaskAwareLoss = "smooth_l1",
        mask_aware_weight: float = 1.0,
        distillation_weight: float = 1.0,
        iou: str = "soft",
        iou_ignore: str = "include",
        ensemble: str = "eq9",
        ensemble_weight: float = 0.7,
        export_path: Optional[str] = None,
        backbone: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mask_aware_loss_kind = _choice(mask_aware_loss, MASK_AWARE_LOSSES, "method.mask_aware_loss")
        self.iou_mode = _choice(iou, IOU_MODES, "method.iou")
        self.iou_ignore = _choice(iou_ignore, IOU_IGNORE, "method.iou_ignore")
        self.ensemble = _choice(ensemble, ENSEMBLES, "method.ensemble")
        if not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(f"method.ensemble_weight={ensemble_weight!r}: expected λ in [0, 1] (the paper: 0.6-0.8)")
        self.ensemble_weight = float(ensemble_weight)
        for key, value in (("mask_aware_weight", mask_aware_weight), ("distillation_weight", distillation_weight)):
            if not value >= 0:
                raise ValueError(f"method.{key}={value!r}: expected a weight >= 0")
        if mask_aware_weight == 0 and distillation_weight == 0:
            raise ValueError("method.mask_aware_weight and method.distillation_weight are both 0: nothing to train")
        self.mask_aware_weight = float(mask_aware_weight)
        self.distillation_weight = float(distillation_weight)
        if temperature is None:
            temperature = float(1.0 / self.teacher.model.logit_scale.detach().float().exp())
        elif not temperature > 0:
            raise ValueError(f"method.temperature={temperature!r}: expected τ > 0 or null (the teacher's own)")
        self.temperature = float(temperature)
        self.clip_input_size = self._check_input_size(clip_input_size)
        self.export_path = export_path

        ckpt_path = (proposals or {}).get("ckpt_path")
        self.proposals = load_proposal_model(ckpt_path, key="method.proposals.ckpt_path", produced_by=self._stage1_command())
        if self.proposals.class_head != "text":
            raise ValueError(
                f"method.proposals.ckpt_path={ckpt_path!r} has class head {self.proposals.class_head!r}: MAFT ensembles the "
                f"proposal model's seen-class scores A^p and needs class_head 'text' (`{self._stage1_command()}`)"
            )
        if self.proposals.joint_dim != self.teacher.embed_dim:
            raise ValueError(
                f"method.proposals.ckpt_path={ckpt_path!r} classifies in a {self.proposals.joint_dim}-d text space; the "
                f"configured CLIP teacher's is {self.teacher.embed_dim}-d: train stage 1 with the same clip= option"
            )
        self._check_stage1_classes(str(ckpt_path))
        self.ip_clip = IPCLIP(self.teacher.model.visual, **dict(ip_clip or {}))

    # -- construction helpers ------------------------------------------------------------------------------------------
    def _stage1_command(self) -> str:
        experiment = STAGE1_EXPERIMENTS.get(self.split.name)
        if experiment is not None:
            return f"python -m zeroseg.train experiment={experiment} (method=query_baseline)"
        return f"python -m zeroseg.train method=query_baseline dataset=<this dataset> (MAFT stage 1 on '{self.split.name}')"

    def _check_stage1_classes(self, ckpt_path: str) -> None:
        """The stage-1 model must have been trained on this split's training classes (no unseen leak)."""
        from zeroseg.build import read_checkpoint

        info = read_checkpoint(ckpt_path, "method.proposals.ckpt_path")["zeroseg"]
        if info["split"]["name"] == self.split.name and list(info["train_class_names"]) != list(self.train_class_names):
            raise ValueError(
                f"method.proposals.ckpt_path={ckpt_path!r} was trained on classes {info['train_class_names']}, this run's "
                f"training classes are {list(self.train_class_names)}: stage 1 must see the same (seen) classes "
                f"(`{self._stage1_command()}`)"
            )

    @staticmethod
    def _check_input_size(size: Optional[Union[int, Sequence[int]]]) -> Optional[tuple[int, int]]:
        if size is None:
            return None
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
            raise ValueError(f"method.clip_input_size={size!r}: expected a positive side, [height, width] or null")
        return (int(pair[0]), int(pair[1]))

    # -- shared pieces -------------------------------------------------------------------------------------------------
    def clip_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` resized to ``clip_input_size`` (bilinear; the public code's 480²)."""
        if self.clip_input_size is None or tuple(images.shape[-2:]) == self.clip_input_size:
            return images
        return F.interpolate(images, size=self.clip_input_size, mode="bilinear", align_corners=False)

    def clip_scores(self, embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
        """Eq. 1: softmax over classes of the cosine similarities / τ; ``(..., D)`` → ``(..., C)``."""
        text = F.normalize(class_embeddings.to(embeddings.dtype), dim=-1)
        return (F.normalize(embeddings, dim=-1) @ text.t() / self.temperature).softmax(dim=-1)

    def seen_columns(self, class_embeddings: Tensor) -> Tensor:
        """``(C,)`` True for the columns of ``class_embeddings`` that are seen classes (Eq. 9's C_seen): rows
        equal to a seen class's text embedding."""
        unseen = set(self.unseen_class_ids)
        seen_ids = [i for i in range(len(self.class_names)) if i not in unseen]
        seen_embeddings = F.normalize(self.class_text_embeddings[seen_ids].to(class_embeddings.dtype), dim=-1)
        similarity = F.normalize(class_embeddings, dim=-1) @ seen_embeddings.t()
        return (similarity > 1 - 1e-5).any(dim=-1)

    # -- training ------------------------------------------------------------------------------------------------------
    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        text = self.train_text_embeddings
        with torch.no_grad():
            mask_logits = self.proposals(images, text)[-1].mask_logits
        pixels = self.teacher.normalize(self.clip_images(images))
        losses: dict[str, Tensor] = {}
        total = images.new_zeros(())
        if self.mask_aware_weight > 0:
            scores = self.clip_scores(self.ip_clip(pixels, mask_logits.sigmoid()), text)  # A^c (B, N, K_seen)
            with torch.no_grad():
                iou, image_index, class_id = proposal_class_iou(
                    mask_logits, labels, self.ignore_index, self.iou_mode, self.iou_ignore
                )
            selected = scores[image_index, :, class_id]  # A^c_select (G, N)
            losses["mask_aware"] = mask_aware_loss(selected, min_max_normalise(iou), self.mask_aware_loss_kind)
            total = total + self.mask_aware_weight * losses["mask_aware"]
        if self.distillation_weight > 0:
            student = self.clip_scores(self.ip_clip.encode_without_masks(pixels), text)
            with torch.no_grad():
                teacher = self.clip_scores(self.teacher.encode_image(self.clip_images(images))[0], text)
            losses["distillation"] = distillation_loss(student, teacher)
            total = total + self.distillation_weight * losses["distillation"]
        losses["loss"] = total
        return losses

    # -- inference -----------------------------------------------------------------------------------------------------
    def proposal_scores(self, images: Tensor, class_embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mask_logits (B, N, h, w), A^p (B, N, C), A^c (B, N, C))`` for ``images`` in ``[0, 1]``."""
        final = self.proposals(images, class_embeddings)[-1]
        proposal_probabilities = final.class_logits.softmax(dim=-1)[..., :-1]  # no-object dropped
        pixels = self.teacher.normalize(self.clip_images(images))
        clip_probabilities = self.clip_scores(self.ip_clip(pixels, final.mask_logits.sigmoid()), class_embeddings)
        return final.mask_logits, proposal_probabilities, clip_probabilities

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """``O = Âᵀ·M`` (App. A) at the size of ``images``: the proposals upsampled (bilinear) and squashed by the
        sigmoid, weighted by the ensembled scores of Eq. 9 (or A^c alone)."""
        mask_logits, proposal_probabilities, clip_probabilities = self.proposal_scores(images, class_embeddings)
        scores = ensemble_scores(
            proposal_probabilities, clip_probabilities, self.seen_columns(class_embeddings), self.ensemble_weight, self.ensemble
        )
        masks = F.interpolate(mask_logits, size=images.shape[-2:], mode="bilinear", align_corners=False).sigmoid()
        return torch.einsum("bnc,bnhw->bchw", scores, masks)

    # -- export --------------------------------------------------------------------------------------------------------
    def export_ip_clip(self, path: Union[str, Path]) -> Path:
        """Write the fine-tuned CLIP (IP-CLIP's tower + the teacher's text tower) for ``clip.pretrained=<path>``."""
        metadata = {
            "teacher": str(self.teacher.describe()),
            "from_layer": str(self.ip_clip.from_layer),
            "frozen_units": ",".join(self.ip_clip.frozen_units),
            "dataset": self.split.name,
        }
        written = self.ip_clip.export(path, self.teacher.model, metadata)
        log.info("MAFT: fine-tuned CLIP written to %s (use clip.pretrained=%s)", written, written)
        return written

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            self.export_ip_clip(self.export_path)
