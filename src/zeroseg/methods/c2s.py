"""``method=c2s``: CLIP-to-Seg distillation (clip_to_seg.txt, Sec. III, Eqs. 1–8, Alg. 1).

A closed-set segmenter (backbone + head projecting to the CLIP joint space, dense features F) is
trained with

* **pseudo masks** Ỹ = Y_s + Ỹ_u from the teacher's dense tokens (Sec. III-B, Eq. 2, Alg. 1;
  :mod:`zeroseg.toolkit.pseudo_masks`);
* **global distillation** (Sec. III-C, Eq. 4): ``W = softmax(C_gᵀF/√D)`` over positions,
  ``F_g = W·Fᵀ``; InfoNCE of F_g against its image's global CLS token C_g, the other images of
  the batch and the FIFO CLS token bank (:class:`~zeroseg.toolkit.token_bank.TokenBank`) as
  negatives. The current batch's tokens enter the bank after the loss, so they are negatives
  through the batch itself, as the paper enqueues them before the update;
* **local distillation** (Eqs. 3, 5, 6): region means F_l of F over every class region of Ỹ,
  InfoNCE of f_i against its region's CLS token c_i (Eq. 3, :mod:`zeroseg.toolkit.region_tokens`)
  with the other regions of the same image as negatives;
* **latent embedding generation** (Sec. III-D): the local features of latent regions F_u are the
  queries of a transformer decoder whose keys/values are the image's global and local CLS
  tokens → A'_u; logits ``X_s = α·F̂ᵀA_s`` (α a logit scale on L2-normalised features) and
  ``X_u = β·cos(F, A'_u)``, ``X = cat(X_s, X_u)``; ``L_s = focal + dice + CE`` against Ỹ where
  latent region j is class N_s + j (Eq. 7). Without latent regions only seen embeddings are used.

``L = L_g + L_l + L_s`` (Eq. 8); each term can be switched off for the ablations (Tables IV, V).
Inference (Sec. III-E) uses the student and the text embeddings of all classes only: never the
teacher's visual encoder.

Knobs the paper leaves open (METHODS.md defaults): τ = 0.07, α = 1/0.07, β = 10, bank size 24,
λ = 0.9, K-means iterations 10 with cosine distance, window sizes {3, 7}, decoder depth 1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.toolkit import TokenBank, encode_regions, generate_pseudo_masks
from zeroseg.toolkit.dense import (
    attention_pooled_feature,
    cosine_logits,
    latent_class_embeddings,
    region_means,
    seen_and_latent_logits,
)
from zeroseg.toolkit.losses import dice_loss, info_nce, softmax_focal_loss

__all__ = ["CLIPToSeg"]


class CLIPToSeg(ZSSMethod):
    """CLIP-to-Seg distillation.

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone`.
        head: factory ``head(in_channels=..., embed_dim=...)`` producing F in the joint space.
        temperature: τ of both InfoNCE terms (0.07; not given by the paper).
        alpha: logit scale of the seen logits on normalised features (1/0.07; not given).
        beta: scale of the latent cosine logits (10; not given).
        bank_size: CLS token bank size (24, Implementation Details; 6 best in Table IX; 0 = none).
        global_distillation / local_distillation / latent_embedding: switch terms (ablations).
        pseudo_masks: keyword arguments of :func:`~zeroseg.toolkit.generate_pseudo_masks`.
        region_encoder: ``masked_image`` (Eq. 3, default), ``crop`` or ``attention`` (one pass,
            IP-CLIP-style); crop_size: input of the crop encoder; region_from_layer: first block
            with per-region CLS copies for ``attention`` (-4: the last four, MAFT's L = 8 of 12).
        max_regions_per_forward: teacher chunk size for region tokens.
        decoder_layers / decoder_heads: the latent-embedding transformer decoder (depth 1; heads
            must divide the joint dimension).
        loss_weights: weights of ``focal``, ``dice``, ``ce`` in L_s (1 each, Eq. 7).
        focal_gamma: focal loss γ (2).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Callable[..., nn.Module],
        temperature: float = 0.07,
        alpha: float = 1 / 0.07,
        beta: float = 10.0,
        bank_size: int = 24,
        global_distillation: bool = True,
        local_distillation: bool = True,
        latent_embedding: bool = True,
        pseudo_masks: Optional[Mapping[str, Any]] = None,
        region_encoder: str = "masked_image",
        crop_size: int = 224,
        region_from_layer: int = -4,
        max_regions_per_forward: int = 64,
        decoder_layers: int = 1,
        decoder_heads: int = 8,
        loss_weights: Optional[Mapping[str, float]] = None,
        focal_gamma: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        dim = self.teacher.embed_dim
        self.backbone = backbone
        self.head = head(in_channels=backbone.channels, embed_dim=dim)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.global_distillation, self.local_distillation = global_distillation, local_distillation
        self.latent_embedding = latent_embedding
        self.pseudo_mask_options = dict(pseudo_masks or {})
        self.region_encoder, self.crop_size, self.region_from_layer = region_encoder, crop_size, region_from_layer
        self.max_regions_per_forward = max_regions_per_forward
        self.loss_weights = {"focal": 1.0, "dice": 1.0, "ce": 1.0, **(loss_weights or {})}
        self.focal_gamma = focal_gamma
        if bank_size < 0:
            raise ValueError(f"method.bank_size must be >= 0, got {bank_size}")
        # bank size 0 (Table IX): the other images of the batch are the only negatives
        self.token_bank = TokenBank(bank_size, dim) if bank_size > 0 else None
        if latent_embedding:
            if dim % decoder_heads:
                raise ValueError(f"method.decoder_heads={decoder_heads} must divide the joint dimension {dim}")
            layer = nn.TransformerDecoderLayer(dim, decoder_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
            self.latent_decoder = nn.TransformerDecoder(layer, decoder_layers)

    # -- inference: student + text embeddings only -----------------------------------------------
    def dense_features(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        return cosine_logits(self.dense_features(images), class_embeddings, 1 / self.alpha)

    # -- training ------------------------------------------------------------------------------------
    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        num_seen = len(self.train_text_embeddings)
        global_cls, teacher_dense = self.teacher.encode_image(images)
        global_cls = global_cls.float()
        pseudo = labels
        if self.local_distillation or self.latent_embedding:
            pseudo = generate_pseudo_masks(teacher_dense, labels, num_seen, self.ignore_index, **self.pseudo_mask_options)
        features = self.dense_features(images).float()  # F: (B, D, h, w)
        losses: dict[str, Tensor] = {}

        if self.global_distillation:  # Eq. 4
            pooled = attention_pooled_feature(features.flatten(2), global_cls)
            keys = global_cls if self.token_bank is None else torch.cat([global_cls, self.token_bank.tokens().to(global_cls)])
            losses["global"] = info_nce(pooled, keys, torch.arange(len(images), device=images.device), self.temperature)
            if self.token_bank is not None:
                self.token_bank.push(global_cls)

        latent = None
        if self.local_distillation or self.latent_embedding:
            regions = encode_regions(
                self.teacher,
                images,
                pseudo,
                self.region_encoder,
                self.ignore_index,
                self.crop_size,
                self.max_regions_per_forward,
                from_layer=self.region_from_layer,
            )
            grid_labels = F.interpolate(pseudo.unsqueeze(1).float(), size=features.shape[-2:], mode="nearest")
            local_features, counts = region_means(features, grid_labels.squeeze(1).long(), regions.labels, regions.valid)
            present = counts > 0
            if self.local_distillation:  # Eqs. 5-6: each region against the other regions of its image
                slots = torch.arange(present.shape[1], device=images.device).expand_as(present)
                targets = torch.where(present, slots, torch.full_like(slots, -1))
                losses["local"] = info_nce(local_features, regions.tokens.float(), targets, self.temperature, present)
            if self.latent_embedding:
                latent = self._latent_embeddings(local_features, regions, present, global_cls, num_seen)

        logits, target = self._segmentation_logits(features, pseudo, num_seen, latent)
        weights = self.loss_weights
        losses["focal"] = weights["focal"] * softmax_focal_loss(logits, target, self.ignore_index, self.focal_gamma)
        losses["dice"] = weights["dice"] * dice_loss(logits, target, self.ignore_index)
        losses["ce"] = weights["ce"] * F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        losses["loss"] = sum(losses.values())
        return losses

    def _latent_embeddings(self, local_features, regions, present, global_cls, num_seen) -> Optional[tuple[Tensor, Tensor]]:
        """A'_u (Sec. III-D): decoder(queries F_u, keys/values [C_g, C_l]) → ``(B, G, D)`` by latent class."""
        is_latent = present & (regions.labels >= num_seen)
        if not bool(is_latent.any()):
            return None  # only seen classes in the batch: seen embeddings alone (Sec. III-D)
        keys = torch.cat([global_cls.unsqueeze(1), regions.tokens.float()], dim=1)
        key_padding = ~torch.cat([torch.ones_like(regions.valid[:, :1]), regions.valid], dim=1)
        generated = self.latent_decoder(local_features, keys, memory_key_padding_mask=key_padding)
        return latent_class_embeddings(generated, regions.labels, is_latent, num_seen)

    def _segmentation_logits(self, features, pseudo, num_seen, latent) -> tuple[Tensor, Tensor]:
        """Eq. 7: ``X_s = α·F̂ᵀA_s``, ``X_u = β·cos(F, A'_u)``."""
        return seen_and_latent_logits(
            features, self.train_text_embeddings, pseudo, num_seen, latent, self.alpha, self.beta, self.ignore_index
        )
