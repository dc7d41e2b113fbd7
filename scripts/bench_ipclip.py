"""Cost of classifying N mask proposals with CLIP (MAFT Table 4a's GFLOPs column): IP-CLIP's one pass
(:class:`zeroseg.models.ip_clip.IPCLIP`, N CLS copies from block L = 8) against the multi-pass "frozen CLIP"
baseline (one 224² crop per proposal, :func:`zeroseg.toolkit.region_tokens.encode_masks` with ``encoder="crop"``).

Paper sizes: CLIP ViT-B/16 (random weights: cost does not depend on them), one 480² image for IP-CLIP, N = 10,
50, 100 proposals (rectangles of random size and place). FLOPs by ``torch.utils.flop_counter.FlopCounterMode``
(2 FLOPs per multiply-add; matrix products and convolutions only); CPU time with one thread, median of
``--repeats`` after a warm-up, one image; the multi-pass side is timed only up to ``--max-timed-crops`` proposals
(its cost is linear in N: one CLIP pass per crop). The paper: 1127 vs 53.4 GFLOPs at N = 100 (21x).

    python scripts/bench_ipclip.py [--proposals 10 50 100] [--repeats 2] [--max-timed-crops 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from zeroseg.clip import CLIPTeacher
from zeroseg.models.ip_clip import IPCLIP
from zeroseg.toolkit.region_tokens import encode_masks


def random_box_masks(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(1, count, size, size)`` binary masks: one rectangle each, 1/8 to 1/2 of the side."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(1, count, size, size)
    for n in range(count):
        height, width = (torch.randint(size // 8, size // 2, (2,), generator=generator)).tolist()
        top = int(torch.randint(0, size - height, (1,), generator=generator))
        left = int(torch.randint(0, size - width, (1,), generator=generator))
        masks[0, n, top : top + height, left : left + width] = 1.0
    return masks


def count_flops(function: Callable[[], object]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    with torch.no_grad():
        function()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proposals", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--image-size", type=int, default=480, help="IP-CLIP's input (the paper: 480)")
    parser.add_argument("--crop-size", type=int, default=224, help="each multi-pass crop (CLIP's 224)")
    parser.add_argument("--from-layer", type=int, default=8, help="IP-CLIP's L (8 of ViT-B/16's 12 blocks)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-timed-crops", type=int, default=10, help="time the multi-pass side only up to this N")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher = CLIPTeacher(arch="ViT-B-16", random_init=True)
    ip_clip = IPCLIP(teacher.model.visual, from_layer=args.from_layer, reference_depth=None).eval()
    image = torch.rand(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    pixels = teacher.normalize(image)
    rows = []
    print(f"CLIP ViT-B/16 (random weights), one {args.image_size}x{args.image_size} image, 1 CPU thread")
    print("| N | IP-CLIP GFLOPs | multi-pass GFLOPs | FLOPs ratio | IP-CLIP s | multi-pass s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for count in args.proposals:
        masks = random_box_masks(count, args.image_size, seed=count)
        valid = torch.ones(1, count, dtype=torch.bool)

        def one_pass() -> torch.Tensor:
            return ip_clip(pixels, masks, valid)

        def multi_pass() -> torch.Tensor:
            return encode_masks(
                teacher, image, masks, valid, encoder="crop", crop_size=args.crop_size, max_regions_per_forward=16
            )

        row = {"N": count, "ipclip_gflops": count_flops(one_pass) / 1e9, "multipass_gflops": count_flops(multi_pass) / 1e9}
        row["flops_ratio"] = row["multipass_gflops"] / row["ipclip_gflops"]
        row["ipclip_s"] = median_seconds(one_pass, args.repeats)
        timed = count <= args.max_timed_crops
        row["multipass_s"] = median_seconds(multi_pass, args.repeats) if timed else float("nan")
        ratio = f"{row['multipass_s'] / row['ipclip_s']:.1f}x" if timed else "(not timed)"
        multipass_time = f"{row['multipass_s']:.2f}" if timed else "(not timed)"
        print(
            f"| {count} | {row['ipclip_gflops']:.1f} | {row['multipass_gflops']:.1f} | {row['flops_ratio']:.1f}x | "
            f"{row['ipclip_s']:.2f} | {multipass_time} | {ratio} |"
        )
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
