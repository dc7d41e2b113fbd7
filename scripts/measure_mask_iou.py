"""CLIP-to-Seg Table XIII (Sec. IV-C "Accuracy of the generated masks for latent classes"): how well the pseudo
masks match the ground truth. Every image of a split gets the configured generator's masks (``method=c2s``'s
``method.pseudo_masks``: ``kmeans`` as the paper, or ``panoptic_cut`` / ``mask_proposal`` of Table XII); every
ground-truth class mask of the image is matched with the generated mask of highest IoU, and the matched
intersections and unions are summed per class over the split. Reported: mIoU over the unseen, the seen and all
classes (paper, VOC with 15 seen / 5 unseen: 58.5 / 53.1 / 49.5), and the mean IoU of the individual matches.

    python scripts/measure_mask_iou.py +world=toy                                   # the toy world (ZSS-Synth, toy CLIP)
    python scripts/measure_mask_iou.py dataset=voc clip=vit_b16 clip.pretrained=<ViT-B-16.pt> paths.data_dir=<data>
    python scripts/measure_mask_iou.py +world=toy method.pseudo_masks.generator=panoptic_cut [--split val] [--images 64]

Arguments after the options are Hydra overrides of the training config (``method=c2s`` is implied).

Protocol: the masks are generated **without the seen-class zeroing** of Eq. 2: the generator sees every position
as unannotated. The paper evaluates seen classes too (53.1 mIoU), which the training-time masks could never reach,
since there the seen positions are zeroed and no latent mask covers a seen pixel; the paper states that the
ground truth is turned into binary (class-agnostic) masks, so the generator is given no label. Ground-truth
``ignore_index`` pixels take no part in any IoU. A class's IoU is Σ intersection / Σ union of its best matches
over the images that contain it (the dataset-level accumulation of semantic-segmentation mIoU); "all" is the
mean over every class present. By construction that mean lies between the unseen and the seen means: the paper's
49.5 for all classes below both 58.5 and 53.1 cannot be this mean, and the paper does not say how it was
computed (a different set of classes, e.g. with background, would explain it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["best_match_statistics", "summarize", "main"]


def best_match_statistics(
    generated: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor, Tensor]:
    """Best-match IoU of every ground-truth class mask of a batch.

    Args:
        generated: ``(B, H, W)`` generated segments: every value other than ``ignore_index`` is one mask.
        target: ``(B, H, W)`` ground-truth class ids ``0..num_classes-1`` or ``ignore_index``.
        num_classes: number of ground-truth classes.
        ignore_index: unlabelled ground truth (taken out of every mask) and uncovered generated pixels.

    Returns ``intersection (B, C)`` and ``union (B, C)`` of each class mask with its best generated mask (the one of
    highest IoU, the first of equals; when no generated mask overlaps the class, intersection 0 and union the class's
    area), and ``present (B, C)``; classes absent from an image give 0 and 0.
    """
    labelled = target != ignore_index
    gt = F.one_hot(torch.where(labelled, target, torch.full_like(target, num_classes)).long(), num_classes + 1)
    gt = gt[..., :num_classes].flatten(1, 2).float()  # (B, P, C)
    covered = (generated != ignore_index) & labelled
    segments = torch.where(covered, generated.long(), torch.full_like(generated.long(), -1))
    # compact segment ids per batch: one column per distinct generated value (+1 for "none")
    values, inverse = torch.unique(segments, return_inverse=True)
    gen = F.one_hot(inverse, len(values)).flatten(1, 2).float()
    gen = gen[..., values >= 0]  # (B, P, G)
    intersection = torch.einsum("bpc,bpg->bcg", gt, gen)
    gt_area, gen_area = gt.sum(dim=1), gen.sum(dim=1)
    union = gt_area.unsqueeze(2) + gen_area.unsqueeze(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))
    present = gt_area > 0
    if gen.shape[-1] == 0:
        return torch.zeros_like(gt_area), gt_area, present
    best = iou.argmax(dim=2, keepdim=True)
    best_intersection = torch.gather(intersection, 2, best).squeeze(2)
    best_union = torch.where(best_intersection > 0, torch.gather(union, 2, best).squeeze(2), gt_area)
    return best_intersection * present, torch.where(present, best_union, torch.zeros_like(best_union)), present


def summarize(
    intersection: Tensor, union: Tensor, match_iou_sum: Tensor, match_count: Tensor, unseen_class_ids: Sequence[int]
) -> dict[str, float]:
    """mIoU (in %) over the unseen, seen and all classes present, from per-class sums ``(C,)``; ``match_*`` give the
    mean IoU of the individual image-level matches."""
    num_classes = len(intersection)
    present = union > 0
    iou = torch.where(present, intersection / union.clamp_min(1e-12), torch.zeros_like(union))
    unseen = torch.zeros(num_classes, dtype=torch.bool)
    unseen[list(unseen_class_ids)] = True
    result = {}
    for name, chosen in (("unseen", unseen), ("seen", ~unseen), ("all", torch.ones_like(unseen))):
        chosen = chosen & present
        result[f"mIoU_{name}"] = float(100 * iou[chosen].mean()) if bool(chosen.any()) else float("nan")
        count = match_count[chosen].sum()
        result[f"match_mean_IoU_{name}"] = float(100 * match_iou_sum[chosen].sum() / count) if count > 0 else float("nan")
    result["classes_unseen"] = int((unseen & present).sum())
    result["classes_seen"] = int((~unseen & present).sum())
    return result


def _compose(overrides: list[str], output_dir: Path):
    from zeroseg.utils import compose_config

    if not any(o.startswith(("method=", "+method=")) for o in overrides):
        overrides = ["method=c2s", *overrides]
    return compose_config("train", [*overrides, "logger=none", "callbacks=minimal"], output_dir)


@torch.no_grad()
def measure(cfg, split: str, max_images: Optional[int], device: str) -> dict[str, object]:
    from zeroseg.build import build_run
    from zeroseg.methods.c2s import CLIPToSeg

    objects = build_run(cfg, with_callbacks=False)
    model, datamodule = objects["model"], objects["datamodule"]
    if not isinstance(model, CLIPToSeg):
        raise ValueError(f"method builds {type(model).__name__}; the pseudo masks measured here are method=c2s's")
    model = model.to(device).eval()
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    split_info = datamodule.split
    num_classes, ignore = split_info.num_classes, model.ignore_index
    intersection, union = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    match_iou, match_count = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    images_done, segments_total = 0, 0
    for batch in loader:
        images, target = batch["image"].to(device).float(), batch["label"].to(device)
        if max_images is not None:
            images, target = images[: max_images - images_done], target[: max_images - images_done]
        _, dense = model.teacher.encode_image(images)
        unannotated = torch.full_like(target, ignore)  # no seen-class zeroing (see the module docstring)
        generated = model.pseudo_masks(images, unannotated, dense.float())
        inter, uni, present = best_match_statistics(generated, target, num_classes, ignore)
        intersection += inter.sum(0).double().cpu()
        union += uni.sum(0).double().cpu()
        per_match = torch.where(present, inter / uni.clamp_min(1), torch.zeros_like(inter))
        match_iou += per_match.sum(0).double().cpu()
        match_count += present.sum(0).double().cpu()
        segments_total += sum(len(torch.unique(g[g != ignore])) for g in generated)
        images_done += len(images)
        if max_images is not None and images_done >= max_images:
            break
    result = summarize(intersection, union, match_iou, match_count, split_info.unseen_class_ids)
    return {
        "dataset": split_info.name,
        "split": split,
        "images": images_done,
        "generator": model.pseudo_mask_generator,
        "masks_per_image": segments_total / max(images_done, 1),
        **result,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--images", type=int, default=None, help="measure the first N images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", type=Path, default=Path("logs/measure_mask_iou"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args, overrides = parser.parse_known_args(argv)
    cfg = _compose(overrides, args.output_dir)
    result = measure(cfg, args.split, args.images, args.device)
    print(
        f"CLIP-to-Seg Table XIII: best-match IoU of the generated masks ({result['generator']}, {result['dataset']} "
        f"{result['split']}, {result['images']} images, {result['masks_per_image']:.1f} masks/image)"
    )
    print("| classes | unseen | seen | all |")
    print("|---|---|---|---|")
    print(f"| mIoU | {result['mIoU_unseen']:.1f} | {result['mIoU_seen']:.1f} | {result['mIoU_all']:.1f} |")
    print(
        f"| mean IoU of the matches | {result['match_mean_IoU_unseen']:.1f} | {result['match_mean_IoU_seen']:.1f} | "
        f"{result['match_mean_IoU_all']:.1f} |"
    )
    print(
        f"({result['classes_unseen']} unseen and {result['classes_seen']} seen classes present; paper, VOC: 58.5 / 53.1 / 49.5)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
