"""``method=baseline``: a dense segmenter classified by CLIP text embeddings, trained on seen labels.

The standard zero-shot segmentation baseline (the "seen-only" row of the C2S and Chimera-Seg
ablations, e.g. CLIP-to-Seg Table IV): backbone → per-pixel embedding head projected to the CLIP
joint dimension → logits = cosine similarity with the class text embeddings divided by a
temperature. Training minimises pixel cross-entropy over the training classes (the seen classes in
the inductive setting; unseen pixels are ignore); evaluation classifies over all classes. Without
any transfer mechanism it shows the classic seen bias: unseen pixels are labelled as seen classes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.methods.base import ZSSMethod
from zeroseg.models.backbones import Backbone
from zeroseg.toolkit.dense import cosine_logits

__all__ = ["Baseline"]


class Baseline(ZSSMethod):
    """Seen-only dense baseline.

    Args:
        backbone: any :class:`~zeroseg.models.backbones.Backbone`.
        head: a factory ``head(in_channels=..., embed_dim=...)`` (Hydra ``_partial_``) building
            the per-pixel embedding head on the backbone's levels, projecting to the teacher's
            joint dimension.
        temperature: softmax temperature of the cosine logits (0.07, CLIP's initial value).
        **kwargs: see :class:`~zeroseg.methods.base.ZSSMethod`.
    """

    def __init__(self, backbone: Backbone, head: Callable[..., nn.Module], temperature: float = 0.07, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature}")
        self.backbone = backbone
        self.head = head(in_channels=backbone.channels, embed_dim=self.teacher.embed_dim)
        self.temperature = temperature

    def pixel_embeddings(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        return cosine_logits(self.pixel_embeddings(images), class_embeddings, self.temperature)

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        labels = batch["label"]
        logits = self.resize_to(self.predict_logits(batch["image"], self.train_text_embeddings), labels.shape[-2:])
        return {"loss": F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index)}
