"""``method=clip_zero_shot``: the CLIP teacher's own dense prediction, with no training.

Each patch token of the frozen teacher (after the final LayerNorm and the visual projection,
:meth:`~zeroseg.clip.teacher.CLIPTeacher.encode_image`) is classified by cosine similarity with
the class text embeddings, and the logits are upsampled to the label size. This is the
training-free reference that bounds what the teacher's dense tokens know (the MaskCLIP-style
baseline). It has no parameters: evaluate it with ``python -m zeroseg.eval method=clip_zero_shot``
(no checkpoint needed) or as a reference row of the benchmark.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from zeroseg.clip.teacher import dense_zero_shot_logits
from zeroseg.methods.base import ZSSMethod

__all__ = ["CLIPZeroShot"]


class CLIPZeroShot(ZSSMethod):
    """Training-free dense zero-shot segmentation by the frozen teacher.

    Args:
        temperature: divides the cosine logits (does not change the arg-max; kept so logits are
            on the same scale as the trained methods').
        **kwargs: see :class:`~zeroseg.methods.base.ZSSMethod`; ``backbone`` is accepted and unused.
    """

    trainable = False

    def __init__(self, temperature: float = 0.07, backbone: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        return dense_zero_shot_logits(self.teacher, images, class_embeddings) / self.temperature

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise RuntimeError("method=clip_zero_shot has no training objective: evaluate it (python -m zeroseg.eval)")
