"""Region CLS tokens: the CLIP image embedding of every class region of a label map
(CLIP-to-Seg Sec. III-C, Eq. 3: ``C_l = CLIP_cls(I ⊙ 1(Ỹ = l))``), all regions of a batch
through the teacher in one batched, chunked forward.

Encoders (``encoder``):

* ``masked_image`` (default, the paper's literal Eq. 3): the image multiplied by the region mask
  (black outside), at the image's own resolution;
* ``crop``: the region's bounding box, pixels outside the region filled with CLIP's mean colour,
  resized to ``crop_size`` (the zsseg / DeOP multi-pass baseline).

Regions are listed per image in ascending label order; results are padded to the largest number
of regions in the batch with a validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["RegionTokens", "find_regions", "encode_regions"]

Encoder = Literal["masked_image", "crop"]


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


def _region_inputs(images: Tensor, masks: Tensor, image_index: Tensor, encoder: Encoder, fill: Tensor, crop_size: int) -> Tensor:
    region_images = images[image_index]
    if encoder == "masked_image":
        return region_images * masks.unsqueeze(1)
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
) -> RegionTokens:
    """CLIP embeddings of every region of ``labels`` in ``images`` (in ``[0, 1]``).

    ``max_regions_per_forward`` chunks the teacher forward to bound memory.
    """
    if encoder not in ("masked_image", "crop"):
        raise ValueError(f"region encoder {encoder!r} is not one of ['masked_image', 'crop']")
    image_index, region_label = find_regions(labels, ignore_index, min_pixels)
    batch = images.shape[0]
    dim = teacher.embed_dim
    per_image = torch.bincount(image_index, minlength=batch)
    max_regions = int(per_image.max()) if len(image_index) else 0
    tokens = images.new_zeros(batch, max_regions, dim)
    padded_labels = torch.full((batch, max_regions), -1, dtype=torch.long, device=images.device)
    valid = torch.zeros(batch, max_regions, dtype=torch.bool, device=images.device)
    if not len(image_index):
        return RegionTokens(tokens, padded_labels, valid)
    fill = teacher.pixel_mean.view(3).to(images.device)
    chunks = []
    for start in range(0, len(image_index), max_regions_per_forward):
        index = image_index[start : start + max_regions_per_forward]
        masks = labels[index] == region_label[start : start + max_regions_per_forward].view(-1, 1, 1)
        chunks.append(teacher.encode_image(_region_inputs(images, masks, index, encoder, fill, crop_size))[0])
    embeddings = torch.cat(chunks).to(tokens.dtype)
    # slot of each region within its image: its rank among the image's regions
    first_of_image = torch.cumsum(per_image, 0) - per_image
    slot = torch.arange(len(image_index), device=images.device) - first_of_image[image_index]
    tokens[image_index, slot] = embeddings
    padded_labels[image_index, slot] = region_label
    valid[image_index, slot] = True
    return RegionTokens(tokens, padded_labels, valid)
