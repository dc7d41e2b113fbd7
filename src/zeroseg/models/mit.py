"""SegFormer's Mix Transformer (MiT-B0…B5) on timm's PyramidVisionTransformerV2.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021, Sec. 3.1 and Table 6. MiT is PVTv2 with MLP ratio 4 in every stage:
overlapping patch embeddings (7×7/4, then 3×3/2), efficient self-attention with spatial
reduction ratios (8, 4, 2, 1), Mix-FFN (a 3×3 depth-wise conv inside the MLP), LayerNorm eps
1e-6 in the blocks. timm's registered ``pvt_v2_b*`` use MLP ratios (8, 8, 4, 4) and carry PVTv2
ImageNet weights: they are a different network and their weights are never loaded here.

Weights come from local files only (``backbone.pretrained``):

* the official NVlabs / mmseg ImageNet files ``mit_b0.pth`` … ``mit_b5.pth``
  (keys ``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ``norm1.weight``, …),
  converted by timm's ``pvt_v2.checkpoint_filter_fn``;
* the Hugging Face ``nvidia/mit-b*`` layout: a model directory holding ``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``, or the weight file itself
  (keys ``segformer.encoder.block.0.0.attention.self.query.weight``, …), converted by
  :func:`convert_hf_segformer`;
* a state dict already in timm's layout.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2, checkpoint_filter_fn
from torch import Tensor

from zeroseg.models.backbones import Backbone
from zeroseg.utils.weights import load_checked_state_dict, read_weight_file

log = logging.getLogger(__name__)

__all__ = ["MixTransformer", "MIT_SIZES", "convert_hf_segformer", "read_mit_weights"]

# depths, embed dims; heads (1, 2, 5, 8) and sr ratios (8, 4, 2, 1) are shared (SegFormer Table 6)
MIT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "b0": ((2, 2, 2, 2), (32, 64, 160, 256)),
    "b1": ((2, 2, 2, 2), (64, 128, 320, 512)),
    "b2": ((3, 4, 6, 3), (64, 128, 320, 512)),
    "b3": ((3, 4, 18, 3), (64, 128, 320, 512)),
    "b4": ((3, 8, 27, 3), (64, 128, 320, 512)),
    "b5": ((3, 6, 40, 3), (64, 128, 320, 512)),
}


def convert_hf_segformer(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``SegformerModel`` keys → timm ``PyramidVisionTransformerV2`` keys.

    HF stores the attention key and value projections separately; timm (like the original MiT)
    stores them stacked as ``kv``.
    """
    out: dict[str, Tensor] = {}
    pending_kv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = re.sub(r"^(segformer\.)?encoder\.", "", key)
        if key.startswith(("decode_head.", "classifier.")):
            continue
        match = re.match(r"patch_embeddings\.(\d+)\.(proj|layer_norm)\.(weight|bias)$", key)
        if match:
            stage, part, kind = int(match.group(1)), match.group(2), match.group(3)
            prefix = "patch_embed" if stage == 0 else f"stages.{stage}.downsample"
            out[f"{prefix}.{'proj' if part == 'proj' else 'norm'}.{kind}"] = value
            continue
        match = re.match(r"layer_norm\.(\d+)\.(weight|bias)$", key)
        if match:
            out[f"stages.{match.group(1)}.norm.{match.group(2)}"] = value
            continue
        match = re.match(r"block\.(\d+)\.(\d+)\.(.+)$", key)
        if not match:
            raise ValueError(f"unexpected key {key!r} in a Hugging Face SegFormer checkpoint")
        prefix = f"stages.{match.group(1)}.blocks.{match.group(2)}"
        rest = match.group(3)
        renames = {
            "layer_norm_1.": "norm1.",
            "layer_norm_2.": "norm2.",
            "attention.self.query.": "attn.q.",
            "attention.self.sr.": "attn.sr.",
            "attention.self.layer_norm.": "attn.norm.",
            "attention.output.dense.": "attn.proj.",
            "mlp.dense1.": "mlp.fc1.",
            "mlp.dwconv.dwconv.": "mlp.dwconv.",
            "mlp.dense2.": "mlp.fc2.",
        }
        kv = re.match(r"attention\.self\.(key|value)\.(weight|bias)$", rest)
        if kv:
            pending_kv.setdefault(f"{prefix}.attn.kv.{kv.group(2)}", {})[kv.group(1)] = value
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                out[f"{prefix}.{new}{rest[len(old) :]}"] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in a Hugging Face SegFormer checkpoint")
    for key, parts in pending_kv.items():
        if set(parts) != {"key", "value"}:
            raise ValueError(f"Hugging Face SegFormer checkpoint has an incomplete key/value pair for {key}")
        out[key] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


def read_mit_weights(path: str, model: PyramidVisionTransformerV2) -> dict[str, Tensor]:
    """Read MiT weights in the NVlabs, Hugging Face or timm layout, converted to timm keys."""
    file = Path(path)
    if file.is_dir():
        config = file / "config.json"
        if config.is_file():
            model_type = json.loads(config.read_text()).get("model_type")
            if model_type != "segformer":
                raise ValueError(f"{config}: model_type={model_type!r}, expected a SegFormer (MiT) checkpoint")
        candidates = [file / "model.safetensors", file / "pytorch_model.bin"]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise FileNotFoundError(
                f"backbone.pretrained={path!r}: the folder holds neither model.safetensors nor pytorch_model.bin"
            )
        file = weights
    state = read_weight_file(str(file), key="backbone.pretrained")
    if any(k.startswith(("segformer.", "encoder.")) for k in state):
        return convert_hf_segformer(state)
    # NVlabs/mmseg originals (patch_embed1...) or timm keys; the classifier head is not ours
    return {k: v for k, v in checkpoint_filter_fn(state, model).items() if not k.startswith("head.")}


class MixTransformer(Backbone):
    """MiT-B0…B5 returning the four stage outputs (strides 4, 8, 16, 32).

    Args:
        variant: ``b0`` … ``b5``.
        pretrained: local weights (see the module docstring) or ``None``.
        drop_path_rate: stochastic depth (0.1 in SegFormer).
        out_indices: which stages to return.
        head_width: recommended decode-head width (SegFormer: 256 for B0/B1, 768 for B2–B5).
    """

    def __init__(
        self,
        variant: str = "b0",
        pretrained: Optional[str] = None,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        head_width: Optional[int] = None,
    ) -> None:
        super().__init__(head_width=head_width)
        if variant not in MIT_SIZES:
            raise ValueError(f"backbone.variant={variant!r} is not a MiT size; expected one of {sorted(MIT_SIZES)}")
        depths, dims = MIT_SIZES[variant]
        self.variant = variant
        self.body = PyramidVisionTransformerV2(
            depths=depths,
            embed_dims=dims,
            num_heads=(1, 2, 5, 8),
            sr_ratios=(8, 4, 2, 1),
            mlp_ratios=(4, 4, 4, 4),
            drop_path_rate=drop_path_rate,
            num_classes=0,
        )
        self.out_indices = tuple(out_indices)
        if pretrained:
            state = read_mit_weights(pretrained, self.body)
            load_checked_state_dict(self.body, state, pretrained, key="backbone.pretrained", require_all=True)
        self.channels = [dims[i] for i in self.out_indices]
        self.strides = [4 * 2**i for i in self.out_indices]

    def forward_features(self, images: Tensor) -> list[Tensor]:
        x = self.body.patch_embed(images)
        outputs = []
        for index, stage in enumerate(self.body.stages):
            x = stage(x)
            if index in self.out_indices:
                outputs.append(x)
            if index >= max(self.out_indices):
                break
        return outputs
