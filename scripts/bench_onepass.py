"""One pass vs many: DeOP's classification stream against the multi-pass frozen-CLIP baseline on the same proposals.

DeOP's headline (deop.txt Table 1: 4.37 vs 1.11 FPS on a V100, COCO-Stuff): the frozen CLIP ViT-B/16 runs ONCE per
image with patch severance and visual prompts, then CAL classifies the N proposals; the multi-pass baseline
(ZegFormer / SimBaseline, ``method=multipass_clip``) crops every proposal and runs CLIP once per crop. Both get
the same N = 100 proposals at the paper's sizes (a 512x512 image, masks at 1/4, 171 COCO-Stuff classes), the
same random-weight ViT-B/16 teacher (``clip.random_init``; speed does not depend on the weights), and both end
with ``O = scores · M`` at the image size. The proposal network is shared by both and is not timed.

Measured: wall time per image (images/s) and FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of one forward
of each stream, counted during the timed run; on CPU with one thread by default.

    python scripts/bench_onepass.py                 # CPU, 1 thread, 1 image (the multi-pass side is slow)
    python scripts/bench_onepass.py --device cuda --images 10
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zeroseg.clip import CLIPTeacher
from zeroseg.clip.prompt_learning import VisualPrompts
from zeroseg.models.anchor_decoders import QueryHeatmapDecoder, heatmap_pooling
from zeroseg.toolkit.matching import semantic_inference
from zeroseg.toolkit.region_tokens import encode_masks


def random_proposals(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` mask logits at ``size``×``size``: random boxes (positive inside), as varied proposals."""
    logits = torch.full((1, count, size, size), -4.0)
    for index in range(count):
        y0, x0 = torch.randint(0, size - 8, (2,), generator=generator).tolist()
        height, width = torch.randint(8, size // 2, (2,), generator=generator).tolist()
        logits[0, index, y0 : y0 + height, x0 : x0 + width] = 4.0
    return logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=1, help="timed images per stream (after one warm-up on GPU)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--proposals", type=int, default=100)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--chunk", type=int, default=100, help="crops per teacher forward in the multi-pass stream")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # nn.MultiheadAttention's inference fast path (torch._native_multi_head_attention) is invisible to
    # FlopCounterMode, which would drop a third of every CLIP block's FLOPs; both streams run without it
    torch.backends.mha.set_fastpath_enabled(False)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)

    teacher = CLIPTeacher("ViT-B-16", random_init=True).to(device)
    visual = teacher.model.visual
    dim = teacher.embed_dim
    prompts = VisualPrompts(visual.transformer.width, tuple(visual.grid_size), len(visual.transformer.resblocks), "adding").to(device)
    cal = QueryHeatmapDecoder(dim, args.proposals, layers=1, heads=8, ffn_dim=1024, heatmap_heads=8, heatmap_projections=True).to(device).eval()
    texts = F.normalize(torch.randn(args.classes + 1, dim, generator=generator), dim=-1).to(device)
    image = torch.rand(1, 3, args.size, args.size, generator=generator).to(device)
    mask_logits = random_proposals(args.proposals, args.size // 4, generator).to(device)
    grid = (args.size // 16, args.size // 16)

    def deop_once() -> torch.Tensor:
        masks = mask_logits.sigmoid()
        _, dense = teacher.encode_image_severed(image, {11: 1.0}, visual_prompts=prompts(grid))
        features = F.normalize(dense, dim=1)
        grid_masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=False)
        pooled = heatmap_pooling(cal(features, grid_masks), features)
        logits = F.normalize(pooled, dim=-1) @ texts.t() / 0.01
        return semantic_inference(logits, mask_logits, image.shape[-2:])

    def multipass_once() -> torch.Tensor:
        upsampled = F.interpolate(mask_logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        binary = upsampled.sigmoid() >= 0.5
        valid = binary.flatten(2).any(-1)
        tokens = encode_masks(teacher, image, binary, valid, "crop", 224, args.chunk)
        probabilities = (F.normalize(tokens, dim=-1) @ texts[:-1].t() / 0.01).softmax(-1) * valid.unsqueeze(-1)
        return torch.einsum("bqk,bqhw->bkhw", probabilities, upsampled.sigmoid())

    results: dict[str, float] = {}
    with torch.no_grad():
        for name, run in (("deop", deop_once), ("multipass_clip", multipass_once)):
            if device.type == "cuda":
                run()  # warm-up (kernels, allocator)
                torch.cuda.synchronize()
            counter = FlopCounterMode(display=False)
            started = time.perf_counter()
            with counter:
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - started
            for _ in range(args.images - 1):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / args.images if args.images > 1 else first
            results[f"{name}_images_per_s"] = 1.0 / seconds
            results[f"{name}_gflops"] = counter.get_total_flops() / 1e9
            print(f"{name:15s} {seconds:8.3f} s/image  {1.0 / seconds:7.3f} images/s  {counter.get_total_flops() / 1e9:9.1f} GFLOPs", flush=True)
    speed = results["deop_images_per_s"] / results["multipass_clip_images_per_s"]
    flops = results["multipass_clip_gflops"] / results["deop_gflops"]
    print(f"one pass vs multi-pass ({args.proposals} proposals, {args.size} px, {args.device}, {args.threads} thread(s)): "
          f"{speed:.2f}x images/s, {flops:.2f}x fewer FLOPs")
    results.update({"speedup": speed, "flops_ratio": flops})
    return results


if __name__ == "__main__":
    main()
