"""The frozen CLIP teacher shared by every method (open_clip models).

The teacher gives, in CLIP's joint embedding space:

* text embeddings of class names from prompt templates (template ensembles are averaged over
  the L2-normalised per-template embeddings, then re-normalised), cached on disk;
* the image (CLS) embedding and the dense patch embeddings of images of any size: patch tokens
  after the final LayerNorm, multiplied by the visual projection, on an ``H/p × W/p`` grid, with
  the position embeddings interpolated to that grid.

It is always frozen and in eval mode; methods never checkpoint its weights (the method base
re-inserts them from this teacher when a checkpoint is loaded) and record only
:meth:`CLIPTeacher.describe`, i.e. where the weights came from.

Weights come from a local file (``pretrained=/path/to/ViT-B-16.pt``: OpenAI's TorchScript
archive, an open_clip ``.pt``/``.bin`` state dict or a ``.safetensors`` file) or an open_clip
pretrained tag (``pretrained=openai``, which needs network access to download). Random weights
are used only when the config says ``random_init: true``; they are drawn from a dedicated
generator seeded by ``random_init_seed``, so the same config always gives the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.clip.prompts import fill_templates, resolve_templates
from zeroseg.utils.weights import read_weight_file

log = logging.getLogger(__name__)

__all__ = [
    "CLIPTeacher",
    "VisualPromptTensors",
    "dense_zero_shot_logits",
    "embed_visual_tokens",
    "interpolate_position_embedding",
    "mask_guided_attention",
    "resolve_layer_indices",
    "severed_block_forward",
    "visual_forward",
    "visual_token_embeddings",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def interpolate_position_embedding(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubically resize the patch part of a ``(1 + h·w, C)`` position embedding to ``grid``."""
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    side = int(round(patch_pos.shape[0] ** 0.5))
    if side * side != patch_pos.shape[0]:
        raise ValueError(f"position embedding with {patch_pos.shape[0]} patch positions is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


def _fingerprint(tensors: Sequence[Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous()
        if array.dtype == torch.bfloat16:
            array = array.view(torch.int16)
        digest.update(np.ascontiguousarray(array.numpy()).data)
    return digest.hexdigest()


def visual_token_embeddings(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The token sequence of an open_clip ``VisionTransformer`` BEFORE ``ln_pre``, ``(B, 1 + h·w, width)``,
    and the grid ``(h, w)``: patch embedding, CLS token, position embeddings interpolated to the grid.
    Prompts that act in the embedding space (DeOP's visual prompts, Sec. 3.2) are added here."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_token, x], dim=1)
    x = x + interpolate_position_embedding(visual.positional_embedding, grid).to(x.dtype)
    return x, grid


def embed_visual_tokens(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The token sequence entering the first block of an open_clip ``VisionTransformer``,
    ``(B, 1 + h·w, width)``, and the grid ``(h, w)``, for CLIP-normalised ``pixels``: patch embedding,
    CLS token, position embeddings interpolated to the grid, ``ln_pre``. A function of the tower, so a
    trainable copy of the teacher's tower (MAFT's IP-CLIP) embeds exactly as the teacher does."""
    x, grid = visual_token_embeddings(visual, pixels)
    return visual.ln_pre(x), grid


class CLIPTeacher(nn.Module):
    """A frozen open_clip ViT giving text, CLS and dense patch embeddings.

    Args:
        arch: open_clip architecture name (``ViT-B-16``); ignored for the layout when
            ``model_cfg`` is given, but still recorded.
        pretrained: local weights file or open_clip tag; ``None`` requires ``random_init``.
        random_init: explicitly allow random weights (tests, debugging).
        random_init_seed: seed of the random weights.
        model_cfg: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for
            architectures open_clip does not register (the toy CLIP).
        templates: a template-set name or a list of templates.
        cache_dir: where text embeddings are cached (``None``: no disk cache).
        text_batch_size: prompts per text-encoder forward.
    """

    def __init__(
        self,
        arch: str = "ViT-B-16",
        pretrained: Optional[str] = None,
        random_init: bool = False,
        random_init_seed: int = 0,
        model_cfg: Optional[Mapping[str, Any]] = None,
        templates: Union[str, Sequence[str]] = "single",
        cache_dir: Optional[str] = None,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        if pretrained is None and not random_init:
            raise ValueError(
                "clip.pretrained is not set: give a local CLIP weights file (e.g. clip.pretrained=/path/ViT-B-16.pt) "
                "or an open_clip tag; random weights need clip.random_init=true"
            )
        self.arch = arch
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.random_init = bool(random_init and pretrained is None)
        self.random_init_seed = random_init_seed
        self.templates = resolve_templates(templates)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.text_batch_size = text_batch_size
        self.model_cfg = dict(model_cfg) if model_cfg is not None else None
        self.model = self._build_model()
        self.model.requires_grad_(False)
        self.model.eval()
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(
                f"clip.arch={arch!r}: dense features need an open_clip VisionTransformer, got {type(visual).__name__}"
            )
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise ValueError(f"clip.arch={arch!r}: attention pooling / final_ln_after_pool visual towers are not supported")
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        self.register_buffer("pixel_mean", torch.tensor(preprocess.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess.get("std", OPENAI_STD)).view(1, 3, 1, 1), persistent=False)
        context_length = self.model.context_length
        if self.model_cfg is not None:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        else:
            self.tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
        self._text_fingerprint: Optional[str] = None

    # -- construction -------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_init_seed)
            if self.model_cfg is not None:
                model = open_clip.CLIP(**self.model_cfg)
            else:
                if self.arch not in open_clip.list_models():
                    raise ValueError(f"clip.arch={self.arch!r} is not an open_clip architecture (see open_clip.list_models())")
                is_tag = self.pretrained is not None and not Path(self.pretrained).exists() and "/" not in self.pretrained
                if is_tag:
                    try:
                        return open_clip.create_model(self.arch, pretrained=self.pretrained)
                    except Exception as error:  # noqa: BLE001
                        raise ValueError(
                            f"clip.pretrained={self.pretrained!r}: could not load this open_clip tag for {self.arch} "
                            f"({error}); without network access give a local weights file instead"
                        ) from error
                model = open_clip.create_model(self.arch, pretrained=None)
        if self.pretrained is not None:
            self._load_weights(model, self.pretrained)
        return model

    def _load_weights(self, model: nn.Module, path: str) -> None:
        state = read_weight_file(path, key="clip.pretrained")
        for key in ("input_resolution", "context_length", "vocab_size"):  # TorchScript extras
            state.pop(key, None)
        state = open_clip.factory.convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = open_clip.model.convert_to_custom_text_state_dict(state)
        open_clip.model.resize_pos_embed(state, model)
        expected = model.state_dict()
        # TorchScript archives also store non-persistent buffers (e.g. the causal attn_mask)
        non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
        state = {k: v for k, v in state.items() if k not in non_persistent}
        mismatched = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if mismatched or missing or unexpected:
            raise ValueError(
                f"CLIP weights {path!r} do not fit clip.arch={self.arch!r}: "
                f"{len(mismatched)} shape mismatches {mismatched[:3]}, {len(missing)} missing keys {missing[:3]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        model.load_state_dict(state, strict=True)
        log.info("CLIP teacher %s loaded from %s", self.arch, path)

    def train(self, mode: bool = True) -> "CLIPTeacher":
        # the teacher is frozen: Lightning's model.train() must not switch it to train mode
        return super().train(False)

    # -- description ----------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.patch_size)  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """Where the teacher came from; stored in method checkpoints instead of its weights."""
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "random_init": self.random_init,
            "random_init_seed": self.random_init_seed if self.random_init else None,
            "model_cfg": self.model_cfg,
            "templates": list(self.templates),
            "embed_dim": self.embed_dim,
        }

    # -- text -------------------------------------------------------------------------------------
    def _text_weights_fingerprint(self) -> str:
        if self._text_fingerprint is None:
            text_tensors = [t for n, t in self.model.state_dict().items() if not n.startswith("visual.")]
            self._text_fingerprint = _fingerprint(text_tensors)
        return self._text_fingerprint

    def _cache_path(self, class_names: Sequence[str]) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        key = json.dumps(
            {
                "arch": self.arch,
                "weights": self._text_weights_fingerprint(),
                "templates": list(self.templates),
                "class_names": list(class_names),
                "context_length": self.model.context_length,
            },
            sort_keys=True,
        )
        return self.cache_dir / f"text_{hashlib.sha1(key.encode()).hexdigest()}.pt"

    @torch.no_grad()
    def encode_text(self, class_names: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(len(class_names), D)``, template-ensembled, on CPU."""
        class_names = list(class_names)
        if not class_names:
            raise ValueError("encode_text: no class names given")
        cache_path = self._cache_path(class_names)
        if cache_path is not None and cache_path.is_file():
            return torch.load(cache_path, map_location="cpu", weights_only=True)
        prompts = fill_templates(self.templates, class_names)
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(prompts), self.text_batch_size):
            tokens = self.tokenizer(prompts[start : start + self.text_batch_size]).to(device)
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        per_template = torch.cat(chunks).reshape(len(class_names), len(self.templates), -1)
        embeddings = F.normalize(per_template.mean(dim=1), dim=-1).cpu()
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: concurrent DDP ranks never read a half-written file
            tmp_path = cache_path.with_suffix(f".tmp{os.getpid()}")
            torch.save(embeddings, tmp_path)
            os.replace(tmp_path, cache_path)
        return embeddings

    # -- images -----------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` → CLIP-normalised input."""
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def embed_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The token sequence entering the first block, ``(B, 1 + h·w, width)``, and the grid ``(h, w)``
        for images in ``[0, 1]`` (see :func:`embed_visual_tokens`)."""
        return embed_visual_tokens(self.model.visual, self.normalize(images))

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(cls (B, D), dense (B, D, H/p, W/p))`` for images ``(B, 3, H, W)`` in ``[0, 1]``.

        Both are in the joint space and not normalised. ``dense`` are the patch tokens after the
        final LayerNorm times the visual projection.
        """
        visual = self.model.visual
        x, grid = self.embed_tokens(images)
        x = visual.transformer(x)
        x = visual.ln_post(x)
        pooled, tokens = visual._global_pool(x)
        cls_embedding = pooled @ visual.proj
        dense = tokens @ visual.proj
        dense = dense.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return cls_embedding, dense

    def encode_image_severed(
        self,
        images: Tensor,
        severance: Optional[Mapping[int, float]] = None,
        mps_layers: Sequence[int] = (),
        mps_masks: Optional[Tensor] = None,
        mps_normalization: str = "softmax",
        visual_prompts: Optional["VisualPromptTensors"] = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`encode_image` with DeOP's patch severance and visual prompts (see :func:`visual_forward`),
        for images in ``[0, 1]``; gradients enabled (they reach the prompts, never the frozen weights)."""
        return visual_forward(
            self.model.visual, self.normalize(images), severance, mps_layers, mps_masks, mps_normalization, visual_prompts
        )


def dense_zero_shot_logits(teacher: "CLIPTeacher", images: Tensor, class_embeddings: Tensor) -> Tensor:
    """Cosine similarity ``(B, C, h, w)`` of every teacher patch token with every class embedding."""
    _, dense = teacher.encode_image(images)
    dense = F.normalize(dense, dim=1)
    return (dense.permute(0, 2, 3, 1) @ F.normalize(class_embeddings, dim=-1).to(dense.dtype).t()).permute(0, 3, 1, 2)


# -- DeOP's one-pass visual forward: patch severance and visual prompts (deop.txt Secs. 3.2, 4.1) ----------


@dataclass
class VisualPromptTensors:
    """What visual prompts add to one forward of the tower, already at the forward's token grid.

    * ``input_addition`` ``(1 + h·w, width)``: added to the token sequence before ``ln_pre`` (VPT
      "adding": one prompt per patch, element-wise, Sec. 3.2 and App. B; the public recipe's learnable
      position embedding at the input). Its first row is the CLS token's.
    * ``prepended`` ``(P, width)``: prompt tokens inserted after the CLS token before ``ln_pre`` (VPT
      "prepending", App. B); they are dropped before the output.
    * ``layer_additions`` ``{block index: (1 + h·w, width)}``: added to the sequence entering that block
      (the public recipe's learnable position embeddings before blocks 1–5); prepended tokens get nothing.
    """

    input_addition: Optional[Tensor] = None
    prepended: Optional[Tensor] = None
    layer_additions: Mapping[int, Tensor] = field(default_factory=dict)


def resolve_layer_indices(layers: Iterable[int], num_layers: int, key: str) -> list[int]:
    """Block indices with negative values counted from the end (-1: the last block); a ``ValueError``
    naming ``key`` for an index outside the tower."""
    resolved = []
    for layer in layers:
        index = int(layer) + num_layers if int(layer) < 0 else int(layer)
        if not 0 <= index < num_layers:
            raise ValueError(f"{key}: layer {layer} is outside the tower's {num_layers} blocks (0..{num_layers - 1} or -1..-{num_layers})")
        resolved.append(index)
    return resolved


def mask_guided_attention(token_masks: Tensor, normalization: str = "softmax") -> Tensor:
    """Mask-guided patch severance attention (DeOP Sec. 4.1, Eq. 1): ``(B, T, T)`` for ``token_masks
    (B, N, T)`` (N proposal masks, soft, on the tokens of the sequence).

    Eq. 1: the attention map of token ``i`` is ``M_i = Σ_j M_{j,i} · M_j``, i.e. the matrix ``Mᵀ M``. It
    replaces the query–key product, so ``normalization="softmax"`` (default, the public code's MPS) takes
    the row softmax of ``Mᵀ M`` as the attention weights; ``"sum"`` divides each row by its sum (the paper
    does not say which). The paper leaves the CLS token open: callers give it mask value 1 in every proposal
    (the public code's choice), so it attends to (and is attended by) every covered patch.
    """
    scores = token_masks.transpose(1, 2) @ token_masks
    if normalization == "softmax":
        return scores.softmax(dim=-1)
    if normalization == "sum":
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    raise ValueError(f"method.severance.mps_normalization={normalization!r} is not one of ['softmax', 'sum']")


def severed_block_forward(block: nn.Module, x: Tensor, alpha: float = 0.0, mixing: Optional[Tensor] = None) -> Tensor:
    """One open_clip ``ResidualAttentionBlock`` (batch first) with its self-attention matrix replaced by
    Generalized Patch Severance (DeOP Sec. 4.1, Eq. 2): ``F_out = (α·E + (1 − α)·Attn)·F_in``.

    The value and output projections, the residuals, the LayerNorms and the MLP are the block's own, so
    α = 0 is the unmodified block and α = 1 leaves no interaction between tokens in this block (each token
    only sees its own value). ``mixing (B, T, T)`` replaces ``Attn`` (all heads) by a given matrix, e.g.
    :func:`mask_guided_attention` (MPS, Eq. 1). Gradients flow through the frozen weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"patch severance alpha={alpha!r}: expected a value in [0, 1] (Eq. 2)")
    attention: nn.MultiheadAttention = block.attn
    batch, tokens, width = x.shape
    heads = attention.num_heads
    head_dim = width // heads
    normed = block.ln_1(x)
    query, key, value = F.linear(normed, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    value = value.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, heads, T, hd)
    if alpha == 1.0 and mixing is None:
        mixed = value  # E·V: no attention matrix is needed
    else:
        if mixing is None:
            query = query.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
            key = key.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, key, value)
        else:
            attended = mixing.to(value.dtype).unsqueeze(1) @ value
        mixed = attended if alpha == 0.0 else alpha * value + (1.0 - alpha) * attended
    out = F.linear(mixed.transpose(1, 2).reshape(batch, tokens, width), attention.out_proj.weight, attention.out_proj.bias)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def visual_forward(
    visual: nn.Module,
    pixels: Tensor,
    severance: Optional[Mapping[int, float]] = None,
    mps_layers: Sequence[int] = (),
    mps_masks: Optional[Tensor] = None,
    mps_normalization: str = "softmax",
    visual_prompts: Optional[VisualPromptTensors] = None,
) -> tuple[Tensor, Tensor]:
    """One pass of an open_clip ``VisionTransformer`` with DeOP's options, gradients enabled (prompt
    gradients flow through the frozen tower): ``(cls (B, D), dense (B, D, h, w))`` as
    :meth:`CLIPTeacher.encode_image` (tokens after ``ln_post`` times ``proj``).

    Args:
        pixels: CLIP-normalised images.
        severance: ``{block: α}`` Generalized Patch Severance (Eq. 2) per block (negative: from the end);
            blocks not named run unmodified. DeOP's best: ``{-1: 1.0}`` (Table 4).
        mps_layers: blocks whose attention is the mask-guided one (MPS, Eq. 1) instead.
        mps_masks: ``(B, N, H', W')`` soft proposal masks in [0, 1] (any resolution; resized to the token
            grid bilinearly, as the public code), needed when ``mps_layers`` is given.
        mps_normalization: ``softmax`` | ``sum`` (see :func:`mask_guided_attention`).
        visual_prompts: see :class:`VisualPromptTensors`.
    """
    blocks = visual.transformer.resblocks
    alphas = dict(zip(resolve_layer_indices((severance or {}).keys(), len(blocks), "method.severance.gps_alphas"), (severance or {}).values()))
    mps = set(resolve_layer_indices(mps_layers, len(blocks), "method.severance.mps_layers"))
    if mps & set(alphas):
        raise ValueError(f"blocks {sorted(mps & set(alphas))} are given both GPS (gps_alphas) and MPS (mps_layers): choose one per block")
    prompts = visual_prompts or VisualPromptTensors()
    x, grid = visual_token_embeddings(visual, pixels)
    if prompts.input_addition is not None:
        x = x + prompts.input_addition.to(x.dtype)
    num_prompts = 0
    if prompts.prepended is not None:
        num_prompts = prompts.prepended.shape[0]
        x = torch.cat([x[:, :1], prompts.prepended.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    x = visual.ln_pre(x)
    mixing = None
    if mps:
        if mps_masks is None:
            raise ValueError("method.severance.mps_layers needs the proposal masks (mps_masks)")
        token_masks = F.interpolate(mps_masks.float(), size=grid, mode="bilinear", align_corners=False).flatten(2)
        # CLS and prompt tokens belong to every proposal (the public code's choice for the CLS token)
        ones = token_masks.new_ones(*token_masks.shape[:2], 1 + num_prompts)
        mixing = mask_guided_attention(torch.cat([ones, token_masks], dim=2), mps_normalization)
    for index, block in enumerate(blocks):
        addition = prompts.layer_additions.get(index)
        if addition is not None:
            addition = addition.to(x.dtype)
            if num_prompts:
                addition = torch.cat([addition[:1], addition.new_zeros(num_prompts, addition.shape[1]), addition[1:]])
            x = x + addition
        if index in mps:
            x = severed_block_forward(block, x, 0.0, mixing)
        elif index in alphas and alphas[index] != 0.0:
            x = severed_block_forward(block, x, float(alphas[index]))
        else:
            x = block(x)
    if num_prompts:
        x = torch.cat([x[:, :1], x[:, 1 + num_prompts :]], dim=1)
    x = visual.ln_post(x)
    pooled, tokens = visual._global_pool(x)
    dense = (tokens @ visual.proj).transpose(1, 2).reshape(x.shape[0], -1, *grid)
    return pooled @ visual.proj, dense
