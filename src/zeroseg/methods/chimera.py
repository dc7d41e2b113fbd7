"""``method=chimera``: Chimera-Seg (chimera_seg.txt, Sec. III-B to III-D, Eqs. 1–6).

A segmentation backbone whose features reach the CLIP joint space through the **CLIP Semantic
Head** (Sec. III-B; :class:`~zeroseg.models.clip_semantic_head.CLIPSemanticHead`): ``F_c = CSH(F)``.
On the pseudo masks Ỹ = Y_s + Ỹ_u of CLIP-to-Seg (:func:`~zeroseg.toolkit.generate_pseudo_masks`)
it is trained with

* **Selective Global Distillation** (Sec. III-C, Eqs. 1–3): ``s = F_cᵀC_g/√D`` per position, Gumbel
  noise ``g = −log(−log ε)``, ``w = softmax((s + g)/τ)`` over H·W, the top-K positions by ``w`` →
  F_k, ``W' = softmax(F_kᵀC_g/√D)``, ``F_g = W'ᵀF_k``; InfoNCE of F_g against the global CLS tokens
  of the batch (gathered across DDP ranks). K starts at ``top_k_start`` (9000) and changes by
  ``top_k_rate`` per optimizer step (−0.1), rounded (Sec. III-C, Implementation Details); it is a
  function of the optimizer step, which checkpoints restore. **Where the paper's K lives**: the
  SegFormer student's map at a 512² crop is 1/4 resolution, 128×128 = 16,384 positions, so K runs
  from 55 % of H·W to 6 % over the 80k iterations. On a smaller map (the toy world's 16×16, a
  ViT-B/16 student's 32×32, whose map reaches SGD without upsampling) an absolute K ≥ H·W selects
  nothing and Gumbel noise only reorders the positions. ``top_k_positions`` (16,384) therefore
  reads start and rate as counts over that many positions and scales them to the map at hand,
  ``K = round((start + rate·step) · H·W / top_k_positions)`` clamped to [1, H·W] (same fractions
  of H·W as the paper's); ``top_k_positions: null`` uses the literal counts (the SegFormer
  recipes at 512², where both agree). ``top_k_budget_steps`` (default ``null``) optionally reads
  the rate per ``top_k_budget_steps / max_steps`` optimizer steps, so that a short proxy run
  (300 toy steps) walks the same K range as the paper's 80k iterations; K and H·W are logged
  (``train/top_k``, ``train/positions``);
* **Semantic Alignment Module** (Eqs. 5–6): prototypes F_l = region means of F_c over Ỹ; for the
  seen classes present in an image, ``KL(softmax(F_l^s·C_g/τ_f) ‖ softmax(A_s·C_g/τ_c))``
  (τ_f = 0.07, τ_c = 0.01; cosine similarities);
* **segmentation** (Sec. III-D, Eq. 4): ``P = F_cᵀ·cat(A_s, F_l^u)`` (cosine × ``logit_scale``),
  ``L_seg`` = focal + CE against Ỹ, latent class j of an image being column ``N_s + j``.

``L = L_seg + L_sgd + λ_sam·L_sam`` (Eq. 4). Inference (Fig. 6) classifies F_c against the text
embeddings of all classes and adds γ to the unseen classes' logits (inductive calibration): in
validation and test only, never in training, and in transductive runs only with
``gamma_in_transductive``.

Switches for Table III: ``csh=false`` replaces the CSH by a plain head to the joint space,
``sgd=false`` distils globally over all positions without selection (CLIP-to-Seg's Eq. 4 without
a bank), ``sam=false`` drops L_sam. Table III's first row ("Baseline") is CLIP-to-Seg itself, i.e.
``method=c2s`` (``experiment=chimera_ablation_modules`` runs it), not this class with its modules
off. CSH ablations (Tables IV–IX) are ``csh_options``; besides the CSH's own arguments, Chimera
reads ``freeze_vencoder: value`` (Table VII's middle row: the value path stays frozen, the FFN
learns) and re-initialises a ``projection: scratch`` with He's initialisation (Table V, ref. [83];
``scratch_init: clip`` keeps CLIP's ``width^-0.5`` scale).

Paper contradictions (the implementation-details value is the default): λ_sam = 0.1 in the
Implementation Details, while Table XII's best (and Table III's full model, 33.8 hIoU) is 0.5.
Knobs the paper leaves open (METHODS.md defaults): τ of SGD 0.07, logit scale 1/0.07, K-means as
CLIP-to-Seg.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.models.clip_semantic_head import CLIPSemanticHead
from zeroseg.toolkit import gather_across_ranks, generate_pseudo_masks, padded_regions
from zeroseg.toolkit.dense import cosine_logits, latent_class_embeddings, region_means, seen_and_latent_logits
from zeroseg.toolkit.losses import info_nce, softmax_focal_loss
from zeroseg.utils.config import check_keyword_options

__all__ = ["ChimeraSeg", "scheduled_top_k", "selective_global_feature", "semantic_alignment_loss"]


def scheduled_top_k(
    step: int,
    start: float,
    rate: float,
    positions: int,
    reference_positions: Optional[int] = None,
    step_scale: float = 1.0,
) -> int:
    """K after ``step`` optimizer steps on a map of ``positions`` (= H·W) positions (Sec. III-C).

    ``round((start + rate·step·step_scale) · positions / reference_positions)`` clamped to
    ``[1, positions]``; ``reference_positions=None`` reads start and rate as absolute counts.
    """
    count = start + rate * step * step_scale
    if reference_positions is not None:
        count = count * positions / reference_positions
    return int(min(max(round(count), 1), positions))


def selective_global_feature(
    features: Tensor, global_cls: Tensor, top_k: int, temperature: float, gumbel: Optional[Tensor] = None
) -> Tensor:
    """SGD's F_g (Eqs. 1–2): ``features (B, D, L)``, ``global_cls (B, D)`` → ``(B, D)``.

    ``gumbel (B, L)`` is the noise ``−log(−log ε)``; ``None`` draws it, zeros select the true top-K.
    """
    scale = math.sqrt(features.shape[1])
    scores = (global_cls.unsqueeze(1) @ features).squeeze(1) / scale  # s: (B, L)
    if gumbel is None:
        uniform = torch.rand_like(scores).clamp_(1e-20, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
    # the top-K of w = softmax((s + g)/τ) are those of its logits (softmax is monotone); ranking the
    # logits avoids the ties of probabilities that underflow to 0 at τ = 0.07
    index = ((scores + gumbel) / temperature).topk(top_k, dim=-1).indices  # (B, K)
    selected = torch.gather(features, 2, index.unsqueeze(1).expand(-1, features.shape[1], -1))  # F_k: (B, D, K)
    weights = torch.softmax(torch.gather(scores, 1, index), dim=-1)  # W' = softmax(F_kᵀC_g/√D)
    return (selected @ weights.unsqueeze(-1)).squeeze(-1)


def semantic_alignment_loss(
    prototypes: Tensor,
    prototype_classes: Tensor,
    seen_present: Tensor,
    text_embeddings: Tensor,
    global_cls: Tensor,
    tau_f: float,
    tau_c: float,
) -> Tensor:
    """Eq. 6, averaged over images with a seen class: ``KL(softmax(cos(F_l^s, C_g)/τ_f) ‖ softmax(cos(A_s, C_g)/τ_c))``
    over each image's seen classes present.

    Args:
        prototypes: ``(B, R, D)`` region means; prototype_classes: ``(B, R)`` their class (seen id).
        seen_present: ``(B, R)`` which entries are seen classes present in the image.
        text_embeddings: ``(N_s, D)`` A_s; global_cls: ``(B, D)`` C_g.
    """
    cls = F.normalize(global_cls.float(), dim=-1).unsqueeze(-1)  # (B, D, 1)
    student = (F.normalize(prototypes.float(), dim=-1) @ cls).squeeze(-1) / tau_f
    texts = F.normalize(text_embeddings.float(), dim=-1)[prototype_classes.clamp(0, len(text_embeddings) - 1)]
    teacher = (texts @ cls).squeeze(-1) / tau_c
    # a finite fill, not -inf: -inf gives NaN gradients (0 · (-inf - -inf)) and all-masked rows
    student = student.masked_fill(~seen_present, -1e9).log_softmax(-1)
    teacher = teacher.masked_fill(~seen_present, -1e9).log_softmax(-1)
    student = torch.where(seen_present, student, torch.zeros_like(student))
    teacher = torch.where(seen_present, teacher, torch.zeros_like(teacher))
    terms = torch.where(seen_present, student.exp() * (student - teacher), torch.zeros_like(student))
    images = seen_present.any(dim=-1)
    if not bool(images.any()):
        return prototypes.new_zeros(())
    return terms.sum(-1)[images].mean()


class ChimeraSeg(ZSSMethod):
    """Chimera-Seg.

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone`.
        head: factory ``head(in_channels=..., embed_dim=...)``: the CSH's trainable MLP (to the
            teacher's visual width) or, with ``csh=false``, the whole head (to the joint space).
        csh: build the CLIP Semantic Head (Table III); csh_options: its ablation arguments
            (:class:`~zeroseg.models.clip_semantic_head.CLIPSemanticHead`; Tables IV–IX), where
            ``freeze_vencoder`` may also be ``value`` (Table VII: V frozen, FFN learnable).
        scratch_init: initialisation of a ``projection: scratch`` (``he``, Table V; ``clip``:
            the CSH's own ``width^-0.5`` normal).
        sgd: selective (top-K, Gumbel) global distillation; ``false`` pools all positions.
        top_k_start / top_k_rate: K schedule (9000, Table XI; −0.1 per step; 0 keeps, +0.1 grows:
            Table X), counted over ``top_k_positions`` positions.
        top_k_positions: the map size start and rate are given for (16,384 = SegFormer's 1/4 map
            at 512²); K is scaled by ``H·W / top_k_positions``; ``None``: absolute counts.
        top_k_budget_steps: read the rate per ``top_k_budget_steps / max_steps`` steps (a short
            proxy run walks the paper's K range); ``None``: per optimizer step (the paper).
        gumbel: add Gumbel noise before the top-K (Sec. III-C, Eq. 1; no paper table).
        sgd_temperature: τ of the Gumbel softmax and of the InfoNCE (0.07).
        sam / sam_weight / tau_f / tau_c: the Semantic Alignment Module and λ_sam (0.1 as in the
            Implementation Details; Table XII's best and Table III's full model use 0.5).
        logit_scale: scale of the cosine logits P (1/0.07; not given by the paper).
        focal_weight / ce_weight / focal_gamma: L_seg = focal + CE.
        gamma: γ added to the unseen logits at evaluation (0; 0.5 in the COCO-Stuff recipe).
        gamma_in_transductive: also apply γ in transductive runs.
        pseudo_masks: keyword arguments of :func:`~zeroseg.toolkit.generate_pseudo_masks`.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Callable[..., nn.Module],
        csh: bool = True,
        csh_options: Optional[Mapping[str, Any]] = None,
        scratch_init: str = "he",
        sgd: bool = True,
        top_k_start: float = 9000,
        top_k_rate: float = -0.1,
        top_k_positions: Optional[int] = 16384,
        top_k_budget_steps: Optional[int] = None,
        gumbel: bool = True,
        sgd_temperature: float = 0.07,
        sam: bool = True,
        sam_weight: float = 0.1,
        tau_f: float = 0.07,
        tau_c: float = 0.01,
        logit_scale: float = 1 / 0.07,
        focal_weight: float = 1.0,
        ce_weight: float = 1.0,
        focal_gamma: float = 2.0,
        gamma: float = 0.0,
        gamma_in_transductive: bool = False,
        pseudo_masks: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        if csh:
            self.head = self._build_csh(backbone, head, dict(csh_options or {}), scratch_init)
        else:
            self.head = head(in_channels=backbone.channels, embed_dim=self.teacher.embed_dim)
        self.sgd, self.top_k_start, self.top_k_rate, self.gumbel = sgd, top_k_start, top_k_rate, gumbel
        if top_k_positions is not None and top_k_positions < 1:
            raise ValueError(f"method.top_k_positions must be >= 1 or null, got {top_k_positions}")
        self.top_k_positions, self.top_k_budget_steps = top_k_positions, top_k_budget_steps
        self.sgd_temperature = sgd_temperature
        self.sam, self.sam_weight, self.tau_f, self.tau_c = sam, sam_weight, tau_f, tau_c
        self.logit_scale = logit_scale
        self.focal_weight, self.ce_weight, self.focal_gamma = focal_weight, ce_weight, focal_gamma
        self.gamma, self.gamma_in_transductive = gamma, gamma_in_transductive
        self.pseudo_mask_options = dict(pseudo_masks or {})
        check_keyword_options(
            generate_pseudo_masks, self.pseudo_mask_options, "method.pseudo_masks",
            passed_by_caller=("dense_features", "labels", "num_seen", "ignore_index"),
        )  # fmt: skip
        unseen = torch.zeros(len(self.class_names), dtype=torch.bool)
        unseen[self.unseen_class_ids] = True
        self.register_buffer("unseen_mask", unseen, persistent=False)

    # -- inference: student + CSH + text embeddings ----------------------------------------------
    def dense_features(self, images: Tensor) -> Tensor:
        """F_c ``(B, D, h, w)``."""
        return self.head(self.backbone(images))

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        return cosine_logits(self.dense_features(images), class_embeddings, 1 / self.logit_scale)

    @property
    def calibration(self) -> float:
        """γ as applied at evaluation (0 in transductive runs unless configured)."""
        if self.setting != "inductive" and not self.gamma_in_transductive:
            return 0.0
        return self.gamma

    def calibrate_logits(self, logits: Tensor) -> Tensor:
        """Evaluation over all classes: ``+γ`` on the unseen classes' logits (Sec. III-D)."""
        if self.calibration == 0.0:
            return logits
        bias = self.unseen_mask.to(logits.dtype) * self.calibration
        return logits + bias.view(1, -1, 1, 1)

    # -- training ----------------------------------------------------------------------------------
    def _build_csh(self, backbone: Backbone, head: Callable[..., nn.Module], options: dict, scratch_init: str) -> CLIPSemanticHead:
        freeze = options.get("freeze_vencoder", True)
        if freeze not in (True, False, "value"):
            raise ValueError(f"method.csh.freeze_vencoder={freeze!r} is not one of [true, false, 'value']")
        if scratch_init not in ("he", "clip"):
            raise ValueError(f"method.scratch_init={scratch_init!r} is not one of ['he', 'clip']")
        options["freeze_vencoder"] = freeze is True
        csh = CLIPSemanticHead(self.teacher.model.visual, backbone.channels, head, **options)
        if freeze == "value":  # Table VII: the value path (LN1, V, out-proj) stays CLIP's, the FFN learns
            for block in csh.vencoder:
                for name in ("ln_1", "v_proj", "out_proj", "ls_1"):
                    if hasattr(block, name):
                        getattr(block, name).requires_grad_(False)
        if options.get("projection") == "scratch" and scratch_init == "he":
            # Table V's "He [83]" row: Kaiming-normal over the fan-in (the visual width) of x·proj
            with torch.no_grad():
                csh.proj.normal_(0.0, math.sqrt(2.0 / csh.proj.shape[0]))
        return csh

    def current_top_k(self, positions: int) -> int:
        """K of SGD at the current optimizer step for a map of ``positions`` (H·W) positions."""
        step_scale = 1.0
        if self.top_k_budget_steps is not None:
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            if max_steps and max_steps > 0:
                step_scale = self.top_k_budget_steps / max_steps
        return scheduled_top_k(self.global_step, self.top_k_start, self.top_k_rate, positions, self.top_k_positions, step_scale)

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        num_seen = len(self.train_text_embeddings)
        global_cls, teacher_dense = self.teacher.encode_image(images)
        global_cls = global_cls.float()
        pseudo = generate_pseudo_masks(teacher_dense, labels, num_seen, self.ignore_index, **self.pseudo_mask_options)
        features = self.dense_features(images).float()  # F_c
        losses: dict[str, Tensor] = {}

        # SGD (Eqs. 1-3); without selection: attention pooling over every position
        flat = features.flatten(2)
        top_k = self.current_top_k(flat.shape[-1]) if self.sgd else flat.shape[-1]
        noise = None if (self.sgd and self.gumbel) else torch.zeros(flat.shape[0], flat.shape[-1], device=flat.device)
        pooled = selective_global_feature(flat, global_cls, top_k, self.sgd_temperature, noise)
        keys = gather_across_ranks(global_cls)
        offset = dist.get_rank() * len(images) if dist.is_available() and dist.is_initialized() else 0
        targets = torch.arange(len(images), device=images.device) + offset
        losses["sgd"] = info_nce(pooled, keys, targets, self.sgd_temperature)

        # prototypes F_l over Ỹ (Eq. 5) at the feature resolution
        grid_pseudo = F.interpolate(pseudo.unsqueeze(1).float(), size=features.shape[-2:], mode="nearest").squeeze(1).long()
        _, _, _, region_labels, region_valid = padded_regions(pseudo, self.ignore_index)
        prototypes, counts = region_means(features, grid_pseudo, region_labels, region_valid)
        present = counts > 0
        if self.sam:
            seen_present = present & (region_labels < num_seen)
            losses["sam"] = self.sam_weight * semantic_alignment_loss(
                prototypes, region_labels, seen_present, self.train_text_embeddings, global_cls, self.tau_f, self.tau_c
            )

        is_latent = present & (region_labels >= num_seen)
        latent = latent_class_embeddings(prototypes, region_labels, is_latent, num_seen) if bool(is_latent.any()) else None
        scale = self.logit_scale
        logits, target = seen_and_latent_logits(
            features, self.train_text_embeddings, pseudo, num_seen, latent, scale, scale, self.ignore_index
        )
        losses["focal"] = self.focal_weight * softmax_focal_loss(logits, target, self.ignore_index, self.focal_gamma)
        losses["ce"] = self.ce_weight * F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        losses["loss"] = sum(losses.values())
        # logged, not optimised: which K selected over how many positions (Sec. III-C)
        losses["top_k"] = torch.tensor(float(top_k))
        losses["positions"] = torch.tensor(float(flat.shape[-1]))
        return losses
