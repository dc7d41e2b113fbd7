"""Benchmark the query-based stack at Mask2Former's recipe sizes.

    python scripts/bench_query.py [--device cpu|cuda] [--parts abc] [--repeats 3]

(a) matcher, batch 16 × 100 queries, 171 classes, ~10 segments per image, 12,544 points, mask
    logits at 128² and targets at 512²: zeroseg's batched costs (all images at once on the device,
    then one assignment per image) vs a straightforward per-image loop computing each image's costs
    separately (as detectron2's Mask2Former does); the assignments are checked equal.
(b) multi-scale deformable attention core (grid_sample), the encoder's self-attention at a 512²
    input: 64² + 32² + 16² queries, 8 heads × 32 channels, 3 levels, 4 points, batch 2.
(c) pixel decoder + transformer decoder forward and backward (ResNet-101 feature shapes at 512²,
    256 wide, 100 queries, 9 decoder layers, 6 encoder layers), batch 2.

Medians of ``--repeats`` runs; one thread on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from scipy.optimize import linear_sum_assignment

from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.models.deformable_attention import multi_scale_deformable_attention
from zeroseg.toolkit.matching import HungarianMatcher, SetCriterion, Targets, _bce_cost, _dice_cost, point_sample


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def per_image_matcher(matcher: HungarianMatcher, class_logits, mask_logits, targets: Targets, seed: int):
    """The straightforward matcher: one cost computation per image, then its assignment."""
    torch.manual_seed(seed)
    coords = torch.rand(1, matcher.num_points, 2, device=mask_logits.device)
    results = []
    for b in range(len(targets.classes)):
        predicted = point_sample(mask_logits[b : b + 1].float(), coords)[0]
        wanted = point_sample(targets.masks[b].unsqueeze(0).float(), coords)[0]
        cost = (
            matcher.cost_mask * _bce_cost(predicted, wanted)
            + matcher.cost_dice * _dice_cost(predicted, wanted)
            - matcher.cost_class * class_logits[b].float().softmax(-1)[:, targets.classes[b]]
        )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        results.append((rows, cols))
    return results


def bench_matcher(device: torch.device, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, queries, classes = 16, 100, 171
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator).to(device)
    mask_logits = torch.randn(batch, queries, 128, 128, generator=generator).to(device)
    target_classes = [torch.randperm(classes, generator=generator)[:10].to(device) for _ in range(batch)]
    target_masks = [(torch.rand(10, 512, 512, generator=generator) > 0.7).float().to(device) for _ in range(batch)]
    targets = Targets(target_classes, target_masks)
    matcher = HungarianMatcher()

    def batched():
        torch.manual_seed(1)
        return matcher(class_logits, mask_logits, targets)

    same = all(
        rows.tolist() == list(r) and cols.tolist() == list(c)
        for (rows, cols), (r, c) in zip(batched(), per_image_matcher(matcher, class_logits, mask_logits, targets, 1))
    )
    ours = timed(batched, repeats, device)
    plain = timed(lambda: per_image_matcher(matcher, class_logits, mask_logits, targets, 1), repeats, device)
    row = ["(a) matcher, 16 × 100 queries, 12,544 points", f"{ours * 1e3:.0f} ms", f"{plain * 1e3:.0f} ms (per image)"]
    print("| " + " | ".join([*row, f"{plain / ours:.2f}×", f"assignments equal: {same}"]) + " |")


def bench_deformable(device: torch.device, repeats: int) -> None:
    shapes = [(64, 64), (32, 32), (16, 16)]
    batch, heads, dim, points = 2, 8, 32, 4
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, device=device)
    locations = torch.rand(batch, tokens, heads, len(shapes), points, 2, device=device)
    weights = torch.rand(batch, tokens, heads, len(shapes), points, device=device).softmax(-1)
    seconds = timed(lambda: multi_scale_deformable_attention(value, shapes, locations, weights), repeats, device)
    what = f"(b) deformable attention core, {tokens} queries × 8 heads × 3 levels × 4 points, batch 2"
    print(f"| {what} | {seconds * 1e3:.0f} ms | | | |")


def bench_decoder(device: torch.device, repeats: int) -> None:
    channels, strides = [256, 512, 1024, 2048], [4, 8, 16, 32]
    segmenter = QuerySegmenter(channels, strides, joint_dim=512).to(device)
    features = [torch.randn(2, c, 512 // s, 512 // s, device=device) for c, s in zip(channels, strides)]
    texts = torch.randn(156, 512, device=device)
    labels = torch.randint(0, 156, (2, 512, 512), device=device)
    criterion = SetCriterion(HungarianMatcher())
    targets = Targets(
        [torch.unique(label)[:10] for label in labels],
        [(labels[b][None] == torch.unique(labels[b])[:10].view(-1, 1, 1)).float() for b in range(2)],
    )

    def forward():
        with torch.no_grad():
            segmenter(features, texts)

    def forward_backward():
        segmenter.zero_grad()
        criterion(segmenter(features, texts), targets)["loss"].backward()

    print(f"| (c) pixel + transformer decoder forward, batch 2 at 512² | {timed(forward, repeats, device):.2f} s | | | |")
    print(f"| (c) forward + set criterion (10 layers) + backward | {timed(forward_backward, repeats, device):.2f} s | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="abc")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print("| what | zeroseg | straightforward | ratio | note |")
    print("|---|---|---|---|---|")
    if "a" in args.parts:
        bench_matcher(device, args.repeats)
    if "b" in args.parts:
        bench_deformable(device, args.repeats)
    if "c" in args.parts:
        bench_decoder(device, args.repeats)


if __name__ == "__main__":
    main()
