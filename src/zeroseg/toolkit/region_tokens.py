"""Region CLS tokens: the CLIP image embedding of every class region of a label map
(CLIP-to-Seg Sec. III-C, Eq. 3: ``C_l = CLIP_cls(I ⊙ 1(Ỹ = l))``), all regions of a batch
through the teacher in one batched, chunked forward.

Encoders (``encoder``):

* ``masked_image`` (default, the paper's literal Eq. 3): the image multiplied by the region mask
  (black outside), at the image's own resolution, or resized (bilinear, aspect kept) so that its longer
  side is ``masked_image_size`` (224: CLIP's pre-training resolution, ~5× fewer teacher FLOPs per region
  than 512² — the paper does not say at which size its masked images enter CLIP);
* ``crop``: the region's bounding box, pixels outside the region filled with CLIP's mean colour,
  resized to ``crop_size`` (the zsseg / DeOP multi-pass baseline);
* ``attention``: one pass per image in which, from block ``from_layer`` on, one copy of the CLS
  token per region attends only to itself and to that region's patches, while patches attend only
  to patches (MAFT's IP-CLIP, Sec. 4.1, Eqs. 2–4, here with the frozen weights); region masks are
  resized to the token grid and thresholded at ``mask_threshold`` (0.5). It needs a teacher whose
  image embedding is its CLS token (``pool_type: tok``).

Regions are listed per image in ascending label order; results are padded to the largest number
of regions in the batch with a validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from zeroseg.clip.teacher import embed_visual_tokens

__all__ = [
    "RegionTokens",
    "encode_masks",
    "encode_regions",
    "find_regions",
    "masked_cls_forward",
    "padded_regions",
    "region_attention_mask",
]

Encoder = Literal["masked_image", "crop", "attention"]


@dataclass
class RegionTokens:
    """Region embeddings of a batch, padded: ``tokens (B, R, D)``, ``labels (B, R)`` (the region's
    label value, ``-1`` for padding), ``valid (B, R)``."""

    tokens: Tensor
    labels: Tensor
    valid: Tensor


def find_regions(labels: Tensor, ignore_index: int = 255, min_pixels: int = 1) -> tuple[Tensor, Tensor]:
    """The (image, label) pairs present in ``labels (B, H, W)`` with at least ``min_pixels`` pixels.

    Returns ``image_index (K,)`` and ``region_label (K,)``, sorted by image then label.
    """
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1)
    valid = flat != ignore_index
    num_values = int(flat[valid].max()) + 1 if bool(valid.any()) else 1
    keys = torch.arange(batch, device=labels.device).unsqueeze(1) * num_values + flat.clamp(max=num_values - 1)
    counts = torch.bincount(keys[valid], minlength=batch * num_values).view(batch, num_values)
    image_index, region_label = torch.nonzero(counts >= min_pixels, as_tuple=True)
    return image_index, region_label


def padded_regions(labels: Tensor, ignore_index: int = 255, min_pixels: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The regions of ``labels (B, H, W)`` per image, padded: ``image_index, region_label, slot``
    (flat, one entry per region) and ``padded_labels (B, R)`` (-1 = padding), ``valid (B, R)``."""
    image_index, region_label = find_regions(labels, ignore_index, min_pixels)
    batch = labels.shape[0]
    per_image = torch.bincount(image_index, minlength=batch)
    max_regions = int(per_image.max()) if len(image_index) else 0
    padded_labels = torch.full((batch, max_regions), -1, dtype=torch.long, device=labels.device)
    valid = torch.zeros(batch, max_regions, dtype=torch.bool, device=labels.device)
    # slot of each region within its image: its rank among the image's regions
    first_of_image = torch.cumsum(per_image, 0) - per_image
    slot = torch.arange(len(image_index), device=labels.device) - first_of_image[image_index]
    padded_labels[image_index, slot] = region_label
    valid[image_index, slot] = True
    return image_index, region_label, slot, padded_labels, valid


def _region_inputs(
    images: Tensor, masks: Tensor, image_index: Tensor, encoder: Encoder, fill: Tensor, crop_size: int, masked_image_size: Optional[int] = None
) -> Tensor:
    region_images = images[image_index]
    if encoder == "masked_image":
        masked = region_images * masks.unsqueeze(1)
        if masked_image_size is None or max(masked.shape[-2:]) == masked_image_size:
            return masked
        scale = masked_image_size / max(masked.shape[-2:])
        size = [max(1, round(side * scale)) for side in masked.shape[-2:]]
        return F.interpolate(masked, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    # crop: fill outside with the mean colour, then crop the mask's box and resize (bilinear)
    filled = torch.where(masks.unsqueeze(1), region_images, fill.view(1, 3, 1, 1).to(images.dtype))
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[-2:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - cols.flip(1).float().argmax(dim=1)
    boxes = torch.stack([torch.arange(len(masks), device=masks.device), x0, y0, x1, y1], dim=1).to(images.dtype)
    return roi_align(filled, boxes, output_size=(crop_size, crop_size), spatial_scale=1.0, sampling_ratio=2, aligned=False)


@torch.no_grad()
def encode_regions(
    teacher,
    images: Tensor,
    labels: Tensor,
    encoder: Encoder = "masked_image",
    ignore_index: int = 255,
    crop_size: int = 224,
    max_regions_per_forward: int = 64,
    min_pixels: int = 1,
    from_layer: int = -4,
    mask_threshold: float = 0.5,
    masked_image_size: Optional[int] = None,
) -> RegionTokens:
    """CLIP embeddings of every region of ``labels`` in ``images`` (in ``[0, 1]``).

    ``max_regions_per_forward`` chunks the teacher forward of the image encoders to bound memory.
    ``masked_image_size`` (``masked_image`` only): the longer side the masked images are resized to before
    the teacher (``None``: the image's own resolution, the literal Eq. 3).
    ``from_layer`` (``attention`` only): first block with per-region CLS copies; negative values
    count from the end (-4: the last four blocks, MAFT's L = 8 for the 12 blocks of ViT-B).
    """
    if encoder not in ("masked_image", "crop", "attention"):
        raise ValueError(f"region encoder {encoder!r} is not one of ['masked_image', 'crop', 'attention']")
    if masked_image_size is not None and not (isinstance(masked_image_size, int) and masked_image_size > 0):
        raise ValueError(f"masked_image_size={masked_image_size!r}: expected a positive whole number of pixels or null")
    image_index, region_label, slot, padded_labels, valid = padded_regions(labels, ignore_index, min_pixels)
    tokens = images.new_zeros(*valid.shape, teacher.embed_dim)
    if not len(image_index):
        return RegionTokens(tokens, padded_labels, valid)
    if encoder == "attention":
        tokens = _attention_region_tokens(teacher, images, labels, padded_labels, valid, from_layer, mask_threshold)
        return RegionTokens(tokens, padded_labels, valid)
    fill = teacher.pixel_mean.view(3).to(images.device)
    chunks = []
    for start in range(0, len(image_index), max_regions_per_forward):
        index = image_index[start : start + max_regions_per_forward]
        masks = labels[index] == region_label[start : start + max_regions_per_forward].view(-1, 1, 1)
        inputs = _region_inputs(images, masks, index, encoder, fill, crop_size, masked_image_size)
        chunks.append(teacher.encode_image(inputs)[0])
    tokens[image_index, slot] = torch.cat(chunks).to(tokens.dtype)
    return RegionTokens(tokens, padded_labels, valid)


def region_attention_mask(region_masks: Tensor, valid: Tensor) -> Tensor:
    """Allowed attention ``(B, R+P, R+P)`` for ``R`` CLS copies followed by ``P`` patches.

    Copy ``r`` attends to itself and to the patches of ``region_masks[:, r]`` (``(B, R, P)``);
    patches attend to patches only; padded copies (``~valid``) attend to themselves only.
    """
    batch, regions, patches = region_masks.shape
    allowed = torch.zeros(batch, regions + patches, regions + patches, dtype=torch.bool, device=region_masks.device)
    allowed[:, :regions, :regions] = torch.eye(regions, dtype=torch.bool, device=region_masks.device)
    allowed[:, :regions, regions:] = region_masks & valid.unsqueeze(-1)
    allowed[:, regions:, regions:] = True
    return allowed


def masked_cls_forward(
    visual, pixels: Tensor, masks: Tensor, valid: Tensor, from_layer: int = -4, mask_threshold: float = 0.5
) -> Tensor:
    """Region embeddings ``(B, R, D)`` of one pass of an open_clip ``VisionTransformer`` in which, from
    block ``from_layer`` on, CLS copy ``r`` attends to itself and to the patches of ``masks[:, r]``
    while patches attend only to patches (MAFT Sec. 4.1, Eqs. 2–4: bias 0 where allowed, −∞ elsewhere).

    ``pixels`` are CLIP-normalised images; ``masks (B, R, H', W')`` (bool or soft, any resolution) are
    resized to the token grid by area and thresholded at ``mask_threshold``; ``valid (B, R)`` marks real
    regions (padded copies attend to themselves only and come out as zeros). Gradients flow, so a
    trainable copy of a tower (IP-CLIP) runs the same code as the frozen teacher's ``attention`` encoder.
    """
    if visual.pool_type != "tok":
        raise ValueError(
            "region encoder 'attention' reads per-region CLS tokens and needs a CLS-pooled teacher or tower "
            f"(pool_type 'tok'); this one pools by {visual.pool_type!r}"
        )
    blocks = visual.transformer.resblocks
    start = from_layer if from_layer >= 0 else len(blocks) + from_layer
    if not 0 <= start < len(blocks):
        raise ValueError(f"region encoder from_layer={from_layer} is outside the tower's {len(blocks)} blocks")
    if masks.dim() != 4 or masks.shape[:2] != valid.shape:
        raise ValueError(f"masks must be (B, R, H, W) with (B, R) = valid's {tuple(valid.shape)}, got {tuple(masks.shape)}")
    x, grid = embed_visual_tokens(visual, pixels)
    for block in blocks[:start]:
        x = block(x)
    # region masks on the token grid, thresholded (MAFT: sigmoid masks ≥ 0.5 after resizing)
    token_masks = F.interpolate(masks.float(), size=grid, mode="area") >= mask_threshold
    token_masks = token_masks.flatten(2)
    regions = masks.shape[1]
    sequence = torch.cat([x[:, :1].expand(-1, regions, -1), x[:, 1:]], dim=1)
    allowed = region_attention_mask(token_masks, valid)
    heads = blocks[0].attn.num_heads
    bias = torch.zeros(allowed.shape, dtype=sequence.dtype, device=sequence.device).masked_fill(~allowed, float("-inf"))
    bias = bias.repeat_interleave(heads, dim=0)
    for block in blocks[start:]:
        sequence = block(sequence, attn_mask=bias)
    tokens = visual.ln_post(sequence[:, :regions]) @ visual.proj
    return tokens.masked_fill(~valid.unsqueeze(-1), 0.0)


def _attention_region_tokens(
    teacher, images: Tensor, labels: Tensor, region_labels: Tensor, valid: Tensor, from_layer: int, mask_threshold: float
) -> Tensor:
    masks = labels.unsqueeze(1) == region_labels.view(*region_labels.shape, 1, 1)
    return masked_cls_forward(teacher.model.visual, teacher.normalize(images), masks, valid, from_layer, mask_threshold)


@torch.no_grad()
def encode_masks(
    teacher,
    images: Tensor,
    masks: Tensor,
    valid: Tensor,
    encoder: Encoder = "crop",
    crop_size: int = 224,
    max_regions_per_forward: int = 64,
    from_layer: int = -4,
    mask_threshold: float = 0.5,
) -> Tensor:
    """Frozen-teacher embeddings ``(B, R, D)`` of arbitrary binary region masks ``(B, R, H, W)`` (e.g.
    mask proposals, thresholded), with the same encoders as :func:`encode_regions`; padded slots
    (``~valid``) are zeros. The multi-pass "frozen CLIP" baseline is ``encoder="crop"``."""
    if encoder not in ("masked_image", "crop", "attention"):
        raise ValueError(f"region encoder {encoder!r} is not one of ['masked_image', 'crop', 'attention']")
    if masks.shape[:2] != valid.shape or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"masks {tuple(masks.shape)} must be (B, R, H, W) with (B, R) = valid {tuple(valid.shape)} "
            f"and (H, W) = the images' {tuple(images.shape[-2:])}"
        )
    if encoder == "attention":
        return masked_cls_forward(teacher.model.visual, teacher.normalize(images), masks, valid, from_layer, mask_threshold)
    tokens = images.new_zeros(*valid.shape, teacher.embed_dim)
    image_index, slot = torch.nonzero(valid, as_tuple=True)
    if not len(image_index):
        return tokens
    region_masks = masks[image_index, slot].bool()
    fill = teacher.pixel_mean.view(3).to(images.device)
    chunks = []
    for start in range(0, len(image_index), max_regions_per_forward):
        chunk = slice(start, start + max_regions_per_forward)
        chunks.append(teacher.encode_image(_region_inputs(images, region_masks[chunk], image_index[chunk], encoder, fill, crop_size))[0])
    tokens[image_index, slot] = torch.cat(chunks).to(tokens.dtype)
    return tokens
