"""``method=c2s``: CLIP-to-Seg distillation (clip_to_seg.txt, Sec. III, Eqs. 1–8, Alg. 1).

A closed-set segmenter (backbone + head projecting to the CLIP joint space, dense features F) is
trained with

* **pseudo masks** Ỹ = Y_s + Ỹ_u from the teacher's dense tokens (Sec. III-B, Eq. 2, Alg. 1;
  :mod:`zeroseg.toolkit.pseudo_masks`); ``pseudo_masks.generator`` gives Table XII's rows: ``kmeans``
  (the paper's, default), ``panoptic_cut`` (LaVG's iterative Normalized Cut [48] on the same tokens) or
  ``mask_proposal`` (the masks of a frozen class-agnostic query model [13], loaded from
  ``pseudo_masks.mask_proposal.ckpt_path``; held outside the module tree, so it is never checkpointed);
* **global distillation** (Sec. III-C, Eq. 4): ``W = softmax(C_gᵀF/√D)`` over positions,
  ``F_g = W·Fᵀ`` (``global_aggregation``: ``attention``; ``mean`` / ``max`` pooling for Table XI);
  InfoNCE of F_g against its image's global CLS token C_g with the FIFO CLS token bank
  (:class:`~zeroseg.toolkit.token_bank.TokenBank`) as the negatives: ``B + 1`` candidates, C_g
  and the B bank tokens of earlier steps (``negatives: bank``, the paper's Eq. 4, whose sum runs
  over the bank only). The current tokens enter the bank after the loss, so they are not their own
  negatives. ``negatives: bank_and_batch`` adds the other images of the (per-rank) batch, whose
  number then depends on the batch size and the number of GPUs. With ``bank_size: 0`` Eq. 4 has
  no negative at all (a constant loss), so the batch's other images are the negatives there — the
  only reading under which Table IX's "0" row trains a global term;
* **local distillation** (Eqs. 3, 5, 6): region means F_l of F over every class region of Ỹ,
  InfoNCE of f_i against its region's CLS token c_i (Eq. 3, :mod:`zeroseg.toolkit.region_tokens`)
  with the other regions of the same image as negatives;
* ``distillation_loss`` replaces the InfoNCE of both terms for Table VI: ``cosine`` (1 − cos to the
  target token), ``l2`` (squared distance to it) or ``froster`` (FROSTER's residual feature
  distillation, ref. [26]: ``f + α·MLP(f)`` regressed onto the token, both L2-normalised; our
  reading, α = ``froster_alpha`` 0.1);
* **latent embedding generation** (Sec. III-D): ``F_u`` — the local features of the latent regions
  *only* — are the queries of a transformer decoder whose keys/values are the image's global and
  local CLS tokens → A'_u. Seen regions are never queries and the batch padding is masked, so an
  image's A'_u depends on its latent features and its CLS tokens only. ``decoder_keys`` selects
  the keys (Table VII: ``[global]``, ``[local]``, both; ``[]`` is Table VII's first row, which the
  paper equates with no latent embedding, so it switches the generation off). ``latent_generator``
  gives Table VIII's rows: ``transformer`` (F_u + CLS tokens, default), ``prototypes`` (F_u
  itself), ``prototypes_mlp``, ``cls_tokens`` (the latent regions' local CLS tokens),
  ``cls_tokens_mlp``. Logits ``X_s = α·F̂ᵀA_s`` (α a logit scale on L2-normalised features) and
  ``X_u = β·cos(F, A'_u)``, ``X = cat(X_s, X_u)``; ``L_s = focal + dice + CE`` against Ỹ where latent
  region j is class N_s + j (Eq. 7). Without latent regions only seen embeddings are used.

``L = L_g + L_l + L_s`` (Eq. 8); each term can be switched off for the ablations (Tables IV, V).
Inference (Sec. III-E) uses the student and the text embeddings of all classes only: never the
teacher's visual encoder.

Paper contradictions (the implementation-details value is the default): the CLS token bank is 24
in the Implementation Details, while Table IX's best is 6 (and Table IX has no 24 row). Knobs the
paper leaves open (METHODS.md defaults): τ = 0.07, α = 1/0.07, β = 10, λ = 0.9, K-means iterations
10 with cosine distance, window sizes {3, 7}, decoder depth 1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.models.proposals import load_proposal_model
from zeroseg.toolkit import TokenBank, encode_regions, generate_pseudo_masks
from zeroseg.toolkit.dense import (
    attention_pooled_feature,
    cosine_logits,
    latent_class_embeddings,
    region_means,
    seen_and_latent_logits,
)
from zeroseg.toolkit.losses import dice_loss, info_nce, softmax_focal_loss
from zeroseg.toolkit.pseudo_masks import GENERATORS, panoptic_cut_pseudo_masks, proposal_pseudo_masks
from zeroseg.utils.config import check_keyword_options

__all__ = ["CLIPToSeg", "global_feature", "global_distillation_loss", "latent_queries"]

NEGATIVES = ("bank", "bank_and_batch")
AGGREGATIONS = ("attention", "mean", "max")
DISTILLATION_LOSSES = ("infonce", "cosine", "l2", "froster")
LATENT_GENERATORS = ("transformer", "prototypes", "prototypes_mlp", "cls_tokens", "cls_tokens_mlp")
DECODER_KEYS = ("global", "local")
# Table XII's "Mask Proposal" [13]: zsseg's proposals come from a MaskFormer trained on the seen classes
PROPOSALS_KEY = "method.pseudo_masks.mask_proposal.ckpt_path"
PROPOSALS_PRODUCED_BY = (
    "python -m zeroseg.train experiment=query_baseline_coco_stuff_resnet101 (the paper setting's seen-class "
    "query model; in the toy world: python -m zeroseg.train method=query_baseline)"
)


def global_feature(features: Tensor, global_cls: Tensor, aggregation: str = "attention") -> Tensor:
    """F_g of ``features (B, D, L)`` (Sec. III-C; Table XI): attention pooling with C_g as the query
    (the paper's), or plain ``mean`` / channel-wise ``max`` over the positions."""
    if aggregation == "attention":
        return attention_pooled_feature(features, global_cls)
    if aggregation == "mean":
        return features.mean(dim=-1)
    if aggregation == "max":
        return features.amax(dim=-1)
    raise ValueError(f"method.global_aggregation={aggregation!r} is not one of {list(AGGREGATIONS)}")


def global_distillation_loss(
    pooled: Tensor, global_cls: Tensor, bank_tokens: Optional[Tensor], temperature: float, in_batch: bool
) -> Tensor:
    """Eq. 4: InfoNCE of each F_g ``(B, D)`` against ``[its own C_g, bank tokens...]``.

    ``bank_tokens (M, D)`` are the CLS tokens of earlier steps (``None``/empty: no bank); with
    ``in_batch`` the other images' C_g are negatives as well. Without bank and without in-batch
    negatives there is nothing to contrast with and the loss is 0.
    """
    bank = bank_tokens if bank_tokens is not None else global_cls.new_zeros(0, global_cls.shape[-1])
    bank = bank.to(global_cls)
    batch = len(global_cls)
    if in_batch:  # candidates: the batch's tokens (own one on the diagonal), then the bank
        keys = torch.cat([global_cls, bank])
        return info_nce(pooled, keys, torch.arange(batch, device=pooled.device), temperature)
    # candidates per image: its own token first, then the bank (Eq. 4's j = 0..B)
    keys = torch.cat([global_cls.unsqueeze(1), bank.unsqueeze(0).expand(batch, -1, -1)], dim=1)  # (B, 1+M, D)
    targets = torch.zeros(batch, 1, dtype=torch.long, device=pooled.device)
    return info_nce(pooled.unsqueeze(1), keys, targets, temperature)


def latent_queries(region_features: Tensor, region_labels: Tensor, is_latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The latent regions of every image packed to the front: ``(B, U, D)`` features, ``(B, U)``
    labels and validity (U = most latent regions of an image). Seen regions and padding are left out
    (Sec. III-D: F_u are the queries)."""
    count = is_latent.sum(dim=1)
    width = int(count.max()) if len(count) else 0
    # stable sort puts each image's latent slots first, in their region order
    order = torch.argsort((~is_latent).to(torch.int8), dim=1, stable=True)[:, :width]
    features = torch.gather(region_features, 1, order.unsqueeze(-1).expand(-1, -1, region_features.shape[-1]))
    labels = torch.gather(region_labels, 1, order)
    valid = torch.arange(width, device=is_latent.device).unsqueeze(0) < count.unsqueeze(1)
    return features, labels, valid


class CLIPToSeg(ZSSMethod):
    """CLIP-to-Seg distillation.

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone`.
        head: factory ``head(in_channels=..., embed_dim=...)`` producing F in the joint space.
        temperature: τ of both InfoNCE terms (0.07; not given by the paper).
        alpha: logit scale of the seen logits on normalised features (1/0.07; not given).
        beta: scale of the latent cosine logits (10; not given).
        bank_size: CLS token bank size (24, Implementation Details; 6 best in Table IX; 0 = none).
        negatives: ``bank`` (Eq. 4: own C_g + the bank) or ``bank_and_batch`` (+ the batch's others).
        global_aggregation: ``attention`` (Sec. III-C) | ``mean`` | ``max`` (Table XI).
        distillation_loss: ``infonce`` (Eqs. 4, 6) | ``cosine`` | ``l2`` | ``froster`` (Table VI);
            froster_alpha: α of the FROSTER residual projector (0.1; our reading of ref. [26]).
        global_distillation / local_distillation / latent_embedding: switch terms (Tables IV, V).
        decoder_keys: keys/values of the latent decoder, subset of ``[global, local]`` (Table VII;
            ``[]`` = no latent embedding, Table VII's first row).
        latent_generator: Table VIII's rows (``transformer`` default; see the module docstring).
        pseudo_masks: ``generator`` (Table XII: ``kmeans`` | ``panoptic_cut`` | ``mask_proposal``), the keyword
            arguments of :func:`~zeroseg.toolkit.generate_pseudo_masks` (``kmeans``), and the sub-dicts
            ``panoptic_cut`` (:func:`~zeroseg.toolkit.pseudo_masks.panoptic_cut_pseudo_masks`) and ``mask_proposal``
            (``ckpt_path`` of the proposal model + :func:`~zeroseg.toolkit.pseudo_masks.proposal_pseudo_masks`).
        region_encoder: ``masked_image`` (Eq. 3, default), ``crop`` or ``attention`` (one pass,
            IP-CLIP-style); crop_size: input of the crop encoder; region_from_layer: first block
            with per-region CLS copies for ``attention`` (-4: the last four, MAFT's L = 8 of 12).
        region_image_size: ``masked_image`` only: the longer side Eq. 3's masked images are resized to before
            the teacher. The paper does not say at which size they enter CLIP; the YAML default is the
            teacher's own input size (224 for ViT-B/16, as CLIP's preprocessing resizes), which brings the
            teacher to ~1/5 of a 512² pass per region (issue 19, README "What each method costs");
            ``None`` feeds them at the image's resolution.
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
        negatives: str = "bank",
        global_aggregation: str = "attention",
        distillation_loss: str = "infonce",
        froster_alpha: float = 0.1,
        global_distillation: bool = True,
        local_distillation: bool = True,
        latent_embedding: bool = True,
        decoder_keys: Sequence[str] = DECODER_KEYS,
        latent_generator: str = "transformer",
        pseudo_masks: Optional[Mapping[str, Any]] = None,
        region_encoder: str = "masked_image",
        crop_size: int = 224,
        region_from_layer: int = -4,
        region_image_size: Optional[int] = None,
        max_regions_per_forward: int = 64,
        decoder_layers: int = 1,
        decoder_heads: int = 8,
        loss_weights: Optional[Mapping[str, float]] = None,
        focal_gamma: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        dim = self.teacher.embed_dim
        for name, value, choices in (
            ("negatives", negatives, NEGATIVES),
            ("global_aggregation", global_aggregation, AGGREGATIONS),
            ("distillation_loss", distillation_loss, DISTILLATION_LOSSES),
            ("latent_generator", latent_generator, LATENT_GENERATORS),
        ):
            if value not in choices:
                raise ValueError(f"method.{name}={value!r} is not one of {list(choices)}")
        decoder_keys = list(decoder_keys)
        if any(k not in DECODER_KEYS for k in decoder_keys) or len(set(decoder_keys)) != len(decoder_keys):
            raise ValueError(f"method.decoder_keys={decoder_keys} must be a subset of {list(DECODER_KEYS)}")
        if bank_size < 0:
            raise ValueError(f"method.bank_size must be >= 0, got {bank_size}")
        self.backbone = backbone
        self.head = head(in_channels=backbone.channels, embed_dim=dim)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.negatives, self.global_aggregation = negatives, global_aggregation
        self.distillation_loss, self.froster_alpha = distillation_loss, froster_alpha
        self.global_distillation, self.local_distillation = global_distillation, local_distillation
        # Table VII: no CLS keys at all is the paper's "without latent embedding" row
        self.latent_embedding = (latent_embedding and bool(decoder_keys)) if latent_generator == "transformer" else latent_embedding
        self.decoder_keys, self.latent_generator = decoder_keys, latent_generator
        options = dict(pseudo_masks or {})
        self.pseudo_mask_generator = str(options.pop("generator", "kmeans"))
        if self.pseudo_mask_generator not in GENERATORS:
            raise ValueError(f"method.pseudo_masks.generator={self.pseudo_mask_generator!r} is not one of {list(GENERATORS)}")
        self.panoptic_cut_options = dict(options.pop("panoptic_cut", None) or {})
        self.proposal_options = dict(options.pop("mask_proposal", None) or {})
        proposal_ckpt = self.proposal_options.pop("ckpt_path", None)
        self.pseudo_mask_options = options  # the kmeans generator's (Sec. III-B)
        per_image = ("dense_features", "labels", "num_seen", "ignore_index")
        check_keyword_options(generate_pseudo_masks, options, "method.pseudo_masks", passed_by_caller=per_image)
        check_keyword_options(panoptic_cut_pseudo_masks, self.panoptic_cut_options, "method.pseudo_masks.panoptic_cut", passed_by_caller=per_image)
        check_keyword_options(
            proposal_pseudo_masks, self.proposal_options, "method.pseudo_masks.mask_proposal",
            passed_by_caller=("mask_logits", "labels", "num_seen", "ignore_index", "scores"),
        )  # fmt: skip
        # the frozen proposal model is kept out of the module tree: never checkpointed, never trained
        self._proposal_model: dict[str, nn.Module] = {}
        if self.pseudo_mask_generator == "mask_proposal":
            self._proposal_model["model"] = load_proposal_model(proposal_ckpt, PROPOSALS_KEY, PROPOSALS_PRODUCED_BY)
        self.region_encoder, self.crop_size, self.region_from_layer = region_encoder, crop_size, region_from_layer
        self.region_image_size = region_image_size
        self.max_regions_per_forward = max_regions_per_forward
        self.loss_weights = {"focal": 1.0, "dice": 1.0, "ce": 1.0, **(loss_weights or {})}
        self.focal_gamma = focal_gamma
        self.token_bank = TokenBank(bank_size, dim) if bank_size > 0 else None
        if distillation_loss == "froster":  # FROSTER's residual projector: f + α·MLP(f)
            self.froster_projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        if self.latent_embedding and latent_generator == "transformer":
            if dim % decoder_heads:
                raise ValueError(f"method.decoder_heads={decoder_heads} must divide the joint dimension {dim}")
            layer = nn.TransformerDecoderLayer(dim, decoder_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
            self.latent_decoder = nn.TransformerDecoder(layer, decoder_layers)
        elif self.latent_embedding and latent_generator.endswith("_mlp"):  # Table VIII's MLP calibrator
            self.latent_decoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        # the recipes' x10 LR for the latent decoder applies to the variants that build one (Table VIII)
        if not hasattr(self, "latent_decoder"):
            self.lr_multipliers.pop("latent_decoder", None)

    # -- inference: student + text embeddings only -----------------------------------------------
    def dense_features(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        return cosine_logits(self.dense_features(images), class_embeddings, 1 / self.alpha)

    # -- training ------------------------------------------------------------------------------------
    def _regression(self, queries: Tensor, targets: Tensor, used: Tensor) -> Tensor:
        """Table VI's non-contrastive distillations of ``queries`` onto ``targets`` (``(..., D)``)."""
        if not bool(used.any()):
            return queries.new_zeros(())
        queries, targets = queries[used], targets[used].to(queries)
        if self.distillation_loss == "cosine":
            return (1 - F.cosine_similarity(queries, targets, dim=-1)).mean()
        if self.distillation_loss == "l2":
            return (queries - targets).pow(2).sum(-1).mean()
        residual = queries + self.froster_alpha * self.froster_projector(queries)  # froster
        return (F.normalize(residual, dim=-1) - F.normalize(targets, dim=-1)).pow(2).sum(-1).mean()

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        num_seen = len(self.train_text_embeddings)
        global_cls, teacher_dense = self.teacher.encode_image(images)
        global_cls = global_cls.float()
        pseudo = labels
        if self.local_distillation or self.latent_embedding:
            pseudo = self.pseudo_masks(images, labels, teacher_dense)
        features = self.dense_features(images).float()  # F: (B, D, h, w)
        losses: dict[str, Tensor] = {}

        if self.global_distillation:  # Eq. 4
            pooled = global_feature(features.flatten(2), global_cls, self.global_aggregation)
            if self.distillation_loss == "infonce":
                bank = self.token_bank.tokens() if self.token_bank is not None else None
                # an empty bank leaves Eq. 4 without negatives: the batch's other images stand in
                in_batch = self.negatives == "bank_and_batch" or bank is None or len(bank) == 0
                losses["global"] = global_distillation_loss(pooled, global_cls, bank, self.temperature, in_batch)
            else:
                losses["global"] = self._regression(pooled, global_cls, torch.ones(len(images), dtype=torch.bool, device=images.device))
            if self.token_bank is not None:  # after the loss: this step's tokens are negatives from the next step on
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
                masked_image_size=self.region_image_size,
            )
            grid_labels = F.interpolate(pseudo.unsqueeze(1).float(), size=features.shape[-2:], mode="nearest")
            local_features, counts = region_means(features, grid_labels.squeeze(1).long(), regions.labels, regions.valid)
            present = counts > 0
            if self.local_distillation:  # Eqs. 5-6: each region against the other regions of its image
                if self.distillation_loss == "infonce":
                    slots = torch.arange(present.shape[1], device=images.device).expand_as(present)
                    targets = torch.where(present, slots, torch.full_like(slots, -1))
                    losses["local"] = info_nce(local_features, regions.tokens.float(), targets, self.temperature, present)
                else:
                    losses["local"] = self._regression(local_features, regions.tokens.float(), present)
            if self.latent_embedding:
                latent = self._latent_embeddings(local_features, regions, present, global_cls, num_seen)

        logits, target = self._segmentation_logits(features, pseudo, num_seen, latent)
        weights = self.loss_weights
        losses["focal"] = weights["focal"] * softmax_focal_loss(logits, target, self.ignore_index, self.focal_gamma)
        losses["dice"] = weights["dice"] * dice_loss(logits, target, self.ignore_index)
        losses["ce"] = weights["ce"] * F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def pseudo_masks(self, images: Tensor, labels: Tensor, teacher_dense: Tensor) -> Tensor:
        """Ỹ = Y_s + Ỹ_u (Sec. III-B) with the configured generator (Table XII): latent classes ``N_s + g`` on the
        unannotated pixels of ``labels (B, H, W)``, from the teacher's ``teacher_dense (B, D, h, w)`` or, for
        ``mask_proposal``, from the proposal model's masks of ``images``."""
        num_seen = len(self.train_text_embeddings)
        if self.pseudo_mask_generator == "kmeans":
            return generate_pseudo_masks(teacher_dense, labels, num_seen, self.ignore_index, **self.pseudo_mask_options)
        if self.pseudo_mask_generator == "panoptic_cut":
            return panoptic_cut_pseudo_masks(teacher_dense, labels, num_seen, self.ignore_index, **self.panoptic_cut_options)
        model = self._proposal_model["model"].to(images.device)
        # a text class head scores the proposals against the seen classes: confidence = 1 - p(no object)
        embeddings = self.train_text_embeddings if model.class_head == "text" else None
        final = model(images, embeddings)[-1]
        scores = None
        if final.class_logits is not None and final.class_logits.shape[-1] > 1:
            scores = 1 - final.class_logits.float().softmax(dim=-1)[..., -1]
        return proposal_pseudo_masks(
            final.mask_logits, labels, num_seen, self.ignore_index, scores=scores, **self.proposal_options
        )

    def _latent_embeddings(self, local_features, regions, present, global_cls, num_seen) -> Optional[tuple[Tensor, Tensor]]:
        """A'_u (Sec. III-D) → ``(B, G, D)`` by latent class, or ``None`` without latent regions.

        ``transformer``: decoder(queries F_u — latent regions only, padding masked —, keys/values
        the chosen CLS tokens); the other generators are Table VIII's rows.
        """
        is_latent = present & (regions.labels >= num_seen)
        if not bool(is_latent.any()):
            return None  # only seen classes in the batch: seen embeddings alone (Sec. III-D)
        source = regions.tokens.float() if self.latent_generator.startswith("cls_tokens") else local_features
        queries, query_labels, query_valid = latent_queries(source, regions.labels, is_latent)
        if self.latent_generator == "transformer":
            generated = torch.zeros_like(queries)
            images = query_valid.any(dim=1)  # an image without latent regions has no query at all
            keys, key_valid = [], []
            if "global" in self.decoder_keys:
                keys.append(global_cls.unsqueeze(1))
                key_valid.append(torch.ones_like(regions.valid[:, :1]))
            if "local" in self.decoder_keys:
                keys.append(regions.tokens.float())
                key_valid.append(regions.valid)
            memory, memory_valid = torch.cat(keys, dim=1)[images], torch.cat(key_valid, dim=1)[images]
            generated[images] = self.latent_decoder(
                queries[images], memory, tgt_key_padding_mask=~query_valid[images], memory_key_padding_mask=~memory_valid
            )
        elif self.latent_generator.endswith("_mlp"):
            generated = self.latent_decoder(queries)
        else:  # prototypes / cls_tokens used as the latent embeddings directly
            generated = queries
        return latent_class_embeddings(generated, query_labels, query_valid, num_seen)

    def _segmentation_logits(self, features, pseudo, num_seen, latent) -> tuple[Tensor, Tensor]:
        """Eq. 7: ``X_s = α·F̂ᵀA_s``, ``X_u = β·cos(F, A'_u)``."""
        return seen_and_latent_logits(
            features, self.train_text_embeddings, pseudo, num_seen, latent, self.alpha, self.beta, self.ignore_index
        )
