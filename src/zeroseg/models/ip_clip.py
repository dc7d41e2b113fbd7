"""MAFT's Image-Proposal CLIP encoder (IP-CLIP; Jiao et al., "Learning Mask-aware CLIP Representations for
Zero-Shot Segmentation", NeurIPS 2023, Sec. 4.1, Eqs. 2–4): a trainable copy of the CLIP teacher's visual tower
that classifies any number of mask proposals of an image in one pass.

Blocks ``0 .. L-1`` run as in CLIP. At block ``L`` the CLS token is repeated once per proposal; from then on CLS
copy ``n`` attends to itself and to the patches where proposal ``n`` is on (the attention bias ``B`` of Eq. 2:
``0`` where ``M̂ = [I(N, N); Flat(M)]`` is 1, ``−∞`` elsewhere, Eq. 3), and patch tokens attend only to patch
tokens (Eq. 4). That pass is :func:`zeroseg.toolkit.region_tokens.masked_cls_forward` — the toolkit's
``attention`` region encoder — run here on trainable weights; it is not written a second time.

* ``from_layer`` (``L``): the paper's ``L = 8`` for the 12 blocks of ViT-B (Table 4e) and 16 for the 24 of ViT-L
  (public code). Given with a ``reference_depth`` it scales with the tower's depth: ``round(L · depth /
  reference_depth)`` (8 of 12 → 3 of the toy CLIP's 4 blocks); ``reference_depth: null`` takes ``L`` as is.
* The number of proposals ``N`` and the input size are arbitrary (position embeddings are interpolated to the
  token grid; masks of any resolution are resized to it by area and thresholded at ``mask_threshold``).
* Frozen units (Table 4d): ``conv`` (patch embedding), ``cls`` (class embedding), ``pos`` (position
  embedding), ``mlp`` (every block's MLP), ``proj`` (the final projection), and ``ln_pre`` (not in the table;
  the public code freezes it). The paper's best row freezes conv, cls, pos and mlp (the default here); the
  public code also freezes proj and ln_pre.
* :meth:`IPCLIP.encode_without_masks` is the ordinary CLS embedding of the copy ("IP-CLIP without masks",
  the student of the self-distillation loss, Eq. 8).
* :meth:`IPCLIP.export` writes a full open_clip checkpoint (this visual tower + the teacher's text weights)
  that ``clip.pretrained=<file>`` loads as the teacher of any method ("plug into frozen-CLIP methods").
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from zeroseg.clip.teacher import embed_visual_tokens
from zeroseg.toolkit.region_tokens import masked_cls_forward

__all__ = ["FROZEN_UNITS", "IPCLIP", "frozen_parameter_names", "resolve_from_layer"]

# Table 4d's units (+ ln_pre, frozen by the public code): unit -> predicate on an open_clip VisionTransformer
# parameter name
FROZEN_UNITS: dict[str, Any] = {
    "conv": lambda name: name.startswith("conv1."),
    "cls": lambda name: name == "class_embedding",
    "pos": lambda name: name == "positional_embedding",
    "mlp": lambda name: name.startswith("transformer.resblocks.") and ".mlp." in name,
    "proj": lambda name: name == "proj",
    "ln_pre": lambda name: name.startswith("ln_pre."),
}


def resolve_from_layer(from_layer: int, depth: int, reference_depth: Optional[int] = 12) -> int:
    """The first block with per-proposal CLS copies for a tower of ``depth`` blocks.

    ``from_layer`` is the paper's ``L`` for a ``reference_depth``-block encoder (8 of 12 for ViT-B) and scales
    to ``round(L · depth / reference_depth)`` (half-up); ``reference_depth=None`` uses ``L`` unscaled. The
    result must be a block of the tower (``0 ≤ L < depth``: at least the last block is mask-aware).
    """
    if isinstance(from_layer, bool) or not isinstance(from_layer, int) or from_layer < 0:
        raise ValueError(f"method.ip_clip.from_layer={from_layer!r}: expected a block index >= 0 (the paper's L, e.g. 8)")
    if reference_depth is None:
        layer = from_layer
    else:
        if isinstance(reference_depth, bool) or not isinstance(reference_depth, int) or reference_depth <= 0:
            raise ValueError(
                f"method.ip_clip.reference_depth={reference_depth!r}: expected a positive depth (12 for ViT-B) or null"
            )
        layer = int(math.floor(from_layer * depth / reference_depth + 0.5))
    if not 0 <= layer < depth:
        where = f"{from_layer} of {reference_depth} blocks -> {layer}" if reference_depth is not None else str(layer)
        raise ValueError(f"method.ip_clip.from_layer={where}: outside the tower's {depth} blocks (expected 0 <= L < {depth})")
    return layer


def frozen_parameter_names(visual: nn.Module, units: Sequence[str]) -> list[str]:
    """Names of the parameters of ``visual`` that the frozen ``units`` cover (unknown units raise)."""
    if isinstance(units, str):
        raise ValueError(
            f"method.ip_clip.frozen_units must be a list of units from {sorted(FROZEN_UNITS)}, got the string {units!r}"
        )
    unknown = [unit for unit in units if unit not in FROZEN_UNITS]
    if unknown:
        raise ValueError(f"method.ip_clip.frozen_units has unknown unit(s) {unknown}: allowed values are {sorted(FROZEN_UNITS)}")
    return [name for name, _ in visual.named_parameters() if any(FROZEN_UNITS[unit](name) for unit in units)]


class IPCLIP(nn.Module):
    """A trainable copy of an open_clip ``VisionTransformer`` that embeds N mask proposals in one pass.

    Args:
        visual: the teacher's visual tower (``teacher.model.visual``); it is deep-copied, never shared, so the
            frozen teacher (the target of Eq. 8) stays unchanged.
        from_layer: the paper's ``L`` (first block with per-proposal CLS copies) for a ``reference_depth``-block
            tower; default 8 of 12 (Table 4e).
        reference_depth: the depth ``from_layer`` refers to; ``None`` = take ``from_layer`` as an absolute index.
        frozen_units: units kept at the teacher's values (Table 4d); default the paper's best row
            ``[conv, cls, pos, mlp]``.
        mask_threshold: proposals (probabilities) resized to the token grid are "on" at ≥ this value (0.5,
            public code; the paper: binary masks).

    Raises:
        ValueError: a tower without CLS pooling (``pool_type`` not ``tok``), ``from_layer`` outside the tower,
            unknown frozen units.
    """

    def __init__(
        self,
        visual: nn.Module,
        from_layer: int = 8,
        reference_depth: Optional[int] = 12,
        frozen_units: Sequence[str] = ("conv", "cls", "pos", "mlp"),
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if getattr(visual, "pool_type", None) != "tok":
            raise ValueError(
                "IP-CLIP reads per-proposal CLS tokens and needs a CLS-pooled CLIP tower (open_clip pool_type 'tok'); "
                f"this one pools by {getattr(visual, 'pool_type', None)!r}"
            )
        if not 0.0 < mask_threshold <= 1.0:
            raise ValueError(f"method.ip_clip.mask_threshold={mask_threshold!r}: expected a value in (0, 1]")
        self.visual = copy.deepcopy(visual)
        self.visual.requires_grad_(True)
        self.depth = len(self.visual.transformer.resblocks)
        self.from_layer = resolve_from_layer(from_layer, self.depth, reference_depth)
        self.mask_threshold = float(mask_threshold)
        self.frozen_units = tuple(frozen_units)
        self.frozen_names = frozen_parameter_names(self.visual, self.frozen_units)
        parameters = dict(self.visual.named_parameters())
        for name in self.frozen_names:
            parameters[name].requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def forward(self, pixels: Tensor, masks: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Proposal embeddings ``(B, N, D)`` (joint space, not normalised) of CLIP-normalised ``pixels (B, 3, H, W)``
        and proposals ``masks (B, N, h, w)`` (probabilities or binary, any resolution); ``valid (B, N)`` marks
        real proposals (default all; padded ones come out as zeros). Eqs. 2–4."""
        if valid is None:
            valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return masked_cls_forward(self.visual, pixels, masks, valid, self.from_layer, self.mask_threshold)

    def encode_without_masks(self, pixels: Tensor) -> Tensor:
        """The ordinary CLS embedding ``(B, D)`` of the copy (every block unmasked): Eq. 8's student ``A_S``."""
        visual = self.visual
        x, _ = embed_visual_tokens(visual, pixels)
        x = visual.transformer(x)
        return visual.ln_post(x[:, 0]) @ visual.proj

    def clip_state_dict(self, teacher_model: nn.Module) -> dict[str, Tensor]:
        """A full open_clip state dict: ``teacher_model``'s tensors with ``visual.*`` replaced by this tower's."""
        state = {name: tensor for name, tensor in teacher_model.state_dict().items() if not name.startswith("visual.")}
        expected_visual = {name for name in teacher_model.state_dict() if name.startswith("visual.")}
        visual_state = {f"visual.{name}": tensor for name, tensor in self.visual.state_dict().items()}
        if set(visual_state) != expected_visual:
            raise ValueError(
                "IP-CLIP's tower does not fit the teacher's CLIP: "
                f"{sorted(set(visual_state) ^ expected_visual)[:3]} differ (another architecture?)"
            )
        state.update(visual_state)
        return state

    def export(self, path: str | Path, teacher_model: nn.Module, metadata: Optional[dict[str, str]] = None) -> Path:
        """Write the fine-tuned CLIP (this tower + ``teacher_model``'s text weights) as an open_clip checkpoint:
        ``.safetensors`` (with ``metadata``) or ``.pt`` (a plain state dict); ``clip.pretrained=<path>`` loads it
        as the teacher of any method (with the teacher's own ``clip`` option: ``clip=toy``, ``clip=vit_b16``).
        The write is atomic (a temporary file, then a rename)."""
        from zeroseg.utils.atomic import atomic_output

        path = Path(path)
        if path.suffix not in (".safetensors", ".pt"):
            raise ValueError(f"IP-CLIP export path {str(path)!r}: expected a .safetensors or .pt file name")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.clip_state_dict(teacher_model).items()}
        with atomic_output(path, what="IP-CLIP export") as handle:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                info = {"format": "open_clip", "written_by": "zeroseg method=maft (IP-CLIP)", **(metadata or {})}
                handle.write(save(state, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}))
            else:
                torch.save(state, handle)
        return path
