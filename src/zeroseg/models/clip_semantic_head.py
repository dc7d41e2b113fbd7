"""Chimera-Seg's CLIP Semantic Head (CSH; chimera_seg.txt Sec. III-B, Fig. 3).

``F → MLP → F_p`` (trainable; the segmentation decode head ending at CLIP's visual width), then the
**VEncoder**, copies of the teacher's last visual block(s) with the query–key attention removed::

    F'_v = V(LN1(F_p)) + F_p          V = output projection ∘ value projection
    F_v  = FFN(LN2(F'_v)) + F'_v

then a trainable normalisation ``F_bn = BN(F_v)``, the residual ``F_res = F_p + F_bn`` and the
teacher's frozen visual projection to the joint space, ``F_c = F_res · proj``. By default only the
MLP and the BatchNorm train (Sec. III-B, last paragraph).

Every ablation of Tables IV–IX is a constructor argument: VEncoder depth (0–3 blocks, default 1),
value path and FFN on/off, VEncoder frozen or learnable, the norm (``bn`` | ``gn`` | ``ln_clip`` — a
frozen copy of the teacher's final ``ln_post`` | ``ln`` — a fresh learnable LayerNorm | ``none``),
residual on/off, and the projection (``frozen`` | ``learnable`` from CLIP | ``scratch``).

The copied weights are this module's own parameters (not the teacher's): they are saved in
checkpoints because the CSH is part of the inference model, while the teacher is not.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CLIPSemanticHead", "ValueBlock"]

Norm = Literal["bn", "gn", "ln_clip", "ln", "none"]
Projection = Literal["frozen", "learnable", "scratch"]


class ValueBlock(nn.Module):
    """One VEncoder block built from an open_clip ``ResidualAttentionBlock`` (weights copied).

    ``x ← x + ls_1(out_proj(v_proj(ln_1(x))))`` (the attention's value path only; no query–key
    mixing, so each position is transformed independently) and ``x ← x + ls_2(mlp(ln_2(x)))``.
    """

    def __init__(self, block: nn.Module, value: bool = True, ffn: bool = True) -> None:
        super().__init__()
        width = block.ln_1.normalized_shape[0]
        self.value, self.ffn = value, ffn
        if value:
            self.ln_1 = copy.deepcopy(block.ln_1).float()
            self.v_proj = nn.Linear(width, width)
            with torch.no_grad():
                self.v_proj.weight.copy_(block.attn.in_proj_weight[2 * width :].float())
                self.v_proj.bias.copy_(block.attn.in_proj_bias[2 * width :].float())
            self.out_proj = nn.Linear(width, width)
            self.out_proj.load_state_dict({k: v.float() for k, v in block.attn.out_proj.state_dict().items()})
            self.ls_1 = copy.deepcopy(block.ls_1).float()
        if ffn:
            self.ln_2 = copy.deepcopy(block.ln_2).float()
            self.mlp = copy.deepcopy(block.mlp).float()
            self.ls_2 = copy.deepcopy(block.ls_2).float()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., width)`` tokens."""
        if self.value:
            x = x + self.ls_1(self.out_proj(self.v_proj(self.ln_1(x))))
        if self.ffn:
            x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class _ChannelLast(nn.Module):
    """Apply a token-wise module (LayerNorm) to an NCHW map."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CLIPSemanticHead(nn.Module):
    """The CSH: backbone features → CLIP-bridged dense features ``F_c`` in the joint space.

    Args:
        visual: the teacher's open_clip visual tower (``transformer.resblocks``, ``ln_post``,
            ``proj``), read once to copy weights.
        in_channels: backbone channels per level.
        mlp: factory ``mlp(in_channels=..., embed_dim=width)`` of the trainable projection to the
            visual width (the SegFormer all-MLP decode head by default).
        blocks: VEncoder depth, the last ``blocks`` visual blocks in order (0–3; 1 best, Table VIII).
        value / ffn: keep the value path / the FFN of each block (Tables IV, V).
        freeze_vencoder: keep the copied blocks frozen (Table VI).
        norm: normalisation after the VEncoder (Table IX; ``bn`` best).
        residual: ``F_res = F_p + F_bn`` (on) or ``F_bn`` alone (Table VII).
        projection: the joint-space projection: CLIP's, ``frozen`` or ``learnable``, or ``scratch``
            (a new linear layer).
        gn_groups: groups of the ``gn`` option (32, or fewer if the width is not divisible).
    """

    def __init__(
        self,
        visual: nn.Module,
        in_channels: Sequence[int],
        mlp: Callable[..., nn.Module],
        blocks: int = 1,
        value: bool = True,
        ffn: bool = True,
        freeze_vencoder: bool = True,
        norm: Norm = "bn",
        residual: bool = True,
        projection: Projection = "frozen",
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        resblocks = visual.transformer.resblocks
        if not 0 <= blocks <= len(resblocks):
            raise ValueError(f"method.csh.blocks={blocks} must be between 0 and the teacher's {len(resblocks)} visual blocks")
        if blocks and not (value or ffn):
            raise ValueError("method.csh: value=false and ffn=false leave the VEncoder blocks empty; set blocks=0 instead")
        width, joint_dim = visual.proj.shape
        self.width, self.embed_dim = width, joint_dim
        self.residual = residual
        self.mlp = mlp(in_channels=in_channels, embed_dim=width)
        self.vencoder = nn.Sequential(*(ValueBlock(block, value, ffn) for block in list(resblocks)[len(resblocks) - blocks :]))
        self.vencoder.requires_grad_(not freeze_vencoder)
        self.norm = self._make_norm(norm, visual, width, gn_groups)
        if projection not in ("frozen", "learnable", "scratch"):
            raise ValueError(f"method.csh.projection={projection!r} is not one of ['frozen', 'learnable', 'scratch']")
        if projection == "scratch":
            self.proj = nn.Parameter(torch.empty(width, joint_dim))
            nn.init.normal_(self.proj, std=width**-0.5)
        else:
            self.proj = nn.Parameter(visual.proj.detach().float().clone(), requires_grad=projection == "learnable")

    @staticmethod
    def _make_norm(norm: str, visual: nn.Module, width: int, gn_groups: int) -> nn.Module:
        if norm == "bn":
            return nn.BatchNorm2d(width)
        if norm == "gn":
            groups = max(g for g in range(1, min(gn_groups, width) + 1) if width % g == 0)
            return nn.GroupNorm(groups, width)
        if norm == "ln_clip":  # CLIP's own final LayerNorm, frozen
            return _ChannelLast(copy.deepcopy(visual.ln_post).float().requires_grad_(False))
        if norm == "ln":
            return _ChannelLast(nn.LayerNorm(width))
        if norm == "none":
            return nn.Identity()
        raise ValueError(f"method.csh.norm={norm!r} is not one of ['bn', 'gn', 'ln_clip', 'ln', 'none']")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Backbone maps (finest first) → ``F_c`` ``(B, joint_dim, h, w)`` at the finest level."""
        projected = self.mlp(features)  # F_p: (B, width, h, w)
        tokens = self.vencoder(projected.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # F_v
        bridged = self.norm(tokens)  # F_bn
        if self.residual:
            bridged = projected + bridged  # F_res
        return torch.einsum("bwhv,wd->bdhv", bridged, self.proj.to(bridged.dtype))  # F_c
