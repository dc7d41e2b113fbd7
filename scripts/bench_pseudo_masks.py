"""GFLOPs per image of CLIP-to-Seg's pseudo-mask generators (Table XII's "GFLOPs" column) at the paper's size:
the teacher's dense grid of 32x32 tokens of 512 channels (CLIP ViT-B/16 at 512x512), labels at 512x512.

    python scripts/bench_pseudo_masks.py [--grid 32] [--dim 512] [--image 512] [--annotated 0.0]
        [--proposal-ckpt <run>/checkpoints/last.ckpt] [--no-teacher] [--seconds]

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs; fvcore, which detectron2-era
papers use, counts it as 1, so the GMAC column is the one comparable with such tables). The counter knows matrix
products and convolutions, not eigen-decompositions: ``torch.linalg.eigh`` (Panoptic Cut's Normalized Cut) is added
with Golub & Van Loan's 9n³ for the symmetric QR algorithm with eigenvectors, per matrix; element-wise work
(thresholds, argmax, unique) is not counted for any generator.

* ``kmeans`` (the paper's, Sec. III-B): window seeds, 10 cosine Lloyd iterations, Algorithm 1.
* ``panoptic_cut`` (ref. [48]): up to 8 Normalized Cuts on the 1024-node graph (the cost grows with the cuts run).
* ``mask_proposal`` (ref. [13]): the proposal network's forward at 512x512: the checkpoint given by
  ``--proposal-ckpt``, else the paper setting's query model (experiment=query_baseline_coco_stuff_resnet101:
  ResNet-101 + Mask2Former, 100 queries) with random weights (FLOPs do not depend on the weights) — plus the
  thresholding, which the counter does not see.

``--memory B`` measures instead the peak memory of ``mask_proposal``'s thresholding alone at batch B (100 proposals
at 1/4 of ``--image``): one resize of every proposal (``query_chunk`` = 100, the straightforward computation)
against the default 16 at a time, each in a fresh process, with the outputs compared.

``--annotated`` gives the fraction of the image annotated with a seen class (top rows), i.e. left out of the
generators (default 0: every position clustered, the cost of an image without seen pixels). The CLIP ViT-B/16
teacher's own forward at the same size, which every generator but ``mask_proposal`` takes its input from, is shown
for reference (``--no-teacher`` skips it).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from zeroseg.toolkit.pseudo_masks import generate_pseudo_masks, panoptic_cut_pseudo_masks, proposal_pseudo_masks


def _eigh_flops(a_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Symmetric eigen-decomposition with eigenvectors: 9n³ per matrix (Golub & Van Loan, Sec. 8.3)."""
    batch = 1
    for size in a_shape[:-2]:
        batch *= size
    return int(batch * 9 * a_shape[-1] ** 3)


CUSTOM = {torch.ops.aten._linalg_eigh: _eigh_flops}


def count(function: Callable[[], Any]) -> tuple[int, float]:
    """(FLOPs, seconds) of one call."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        started = time.perf_counter()
        function()
        seconds = time.perf_counter() - started
    return counter.get_total_flops(), seconds


def paper_proposal_model(joint_dim: int) -> torch.nn.Module:
    """The paper setting's query model (experiment=query_baseline_coco_stuff_resnet101), random weights."""
    import hydra

    from zeroseg.models.proposals import ProposalModel
    from zeroseg.models.query_segmenter import QuerySegmenter
    from zeroseg.utils import compose_config

    cfg = compose_config("train", ["experiment=query_baseline_coco_stuff_resnet101", "logger=none"], "/tmp/zeroseg_bench")
    backbone_cfg = dict(cfg.backbone)
    backbone_cfg["pretrained"] = None
    backbone = hydra.utils.instantiate(backbone_cfg)
    segmenter = QuerySegmenter(list(backbone.channels), list(backbone.strides), joint_dim, **dict(cfg.method.segmenter))
    return ProposalModel(backbone, segmenter, joint_dim, float(cfg.method.get("input_scale", 1.0)), source="random weights")


def _peak_rss_child(batch: int, queries: int, image: int, query_chunk: int, results: Any) -> None:
    """Peak resident memory above the inputs of one ``proposal_pseudo_masks`` call (Linux: the high-water mark
    is reset after the inputs exist; elsewhere it includes the process's earlier peak)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(batch, queries, image // 4, image // 4)
    labels = torch.full((batch, image, image), 255, dtype=torch.long)
    reset, status = Path("/proc/self/clear_refs"), Path("/proc/self/status")

    def status_kb(field: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
        return int(line.split()[1])

    linux = reset.exists() and status.exists()
    if linux:
        reset.write_text("5")  # resets VmHWM to the current RSS
        inputs_kb = status_kb("VmRSS")
    start = time.perf_counter()
    out = proposal_pseudo_masks(logits, labels, num_seen=15, query_chunk=query_chunk)
    seconds = time.perf_counter() - start
    if linux:
        peak_mb = (status_kb("VmHWM") - inputs_kb) / 1024
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put((query_chunk, peak_mb, seconds, hashlib.sha1(out.numpy().tobytes()).hexdigest()))


def memory_table(batch: int, image: int, queries: int = 100) -> int:
    context = multiprocessing.get_context("spawn")
    rows = []
    for query_chunk in (queries, 16):
        results = context.Queue()
        child = context.Process(target=_peak_rss_child, args=(batch, queries, image, query_chunk, results))
        child.start()
        rows.append(results.get())
        child.join()
    (_, straight_mb, straight_s, straight_hash), (_, chunked_mb, chunked_s, chunked_hash) = rows
    print(f"mask_proposal thresholding, batch {batch}, {queries} proposals at {image // 4}^2 -> labels {image}^2, one thread:")
    print("| proposals resized at a time | peak memory above the inputs (MB) | seconds |")
    print("|---|---|---|")
    print(f"| {queries} (all: straightforward) | {straight_mb:.0f} | {straight_s:.2f} |")
    print(f"| 16 (default) | {chunked_mb:.0f} | {chunked_s:.2f} |")
    print(f"memory ratio {chunked_mb / straight_mb:.3f}, time ratio {chunked_s / straight_s:.2f}, "
          f"same pseudo masks: {'yes' if straight_hash == chunked_hash else 'NO'}")  # fmt: skip
    return 0 if straight_hash == chunked_hash else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--annotated", type=float, default=0.0)
    parser.add_argument("--proposal-ckpt", default=None)
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", type=int, default=None, metavar="B", help="peak memory of the thresholding at batch B")
    args = parser.parse_args(argv)
    if args.memory is not None:
        return memory_table(args.memory, args.image)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dense = torch.randn(1, args.dim, args.grid, args.grid, device=device)
    labels = torch.full((1, args.image, args.image), 255, dtype=torch.long, device=device)
    labels[:, : int(args.annotated * args.image)] = 0
    images = torch.rand(1, 3, args.image, args.image, device=device)
    rows: list[tuple[str, int, float, str]] = []

    flops, seconds = count(lambda: generate_pseudo_masks(dense, labels, num_seen=15))
    rows.append(("kmeans (Ours, Sec. III-B)", flops, seconds, "windows {3,7}, 10 iterations, lambda 0.9"))
    flops, seconds = count(lambda: panoptic_cut_pseudo_masks(dense, labels, num_seen=15))
    masks = panoptic_cut_pseudo_masks(dense, labels, num_seen=15)
    cuts = len(torch.unique(masks[masks != 255])) - 1  # the last segment is the remainder
    rows.append(("panoptic_cut (Panoptic cut [48])", flops, seconds, f"tau 0.3, {cuts} cuts of max 8, eigh 9n^3"))
    if args.proposal_ckpt:
        from zeroseg.models.proposals import load_proposal_model

        model = load_proposal_model(args.proposal_ckpt, key="--proposal-ckpt")
        source = args.proposal_ckpt
    else:
        model = paper_proposal_model(args.dim)
        source = "ResNet-101 Mask2Former, 100 queries, random weights"
    model = model.to(device)

    def proposals() -> None:
        final = model(images)[-1]
        proposal_pseudo_masks(final.mask_logits, labels, num_seen=15)

    flops, seconds = count(proposals)
    rows.append(("mask_proposal (Mask Proposal [13])", flops, seconds, source))
    if not args.no_teacher:
        import hydra

        from zeroseg.utils import compose_config

        cfg = compose_config("train", ["clip=vit_b16", "clip.pretrained=null", "clip.random_init=true"], "/tmp/zeroseg_bench")
        teacher = hydra.utils.instantiate(cfg.clip).to(device)
        flops, seconds = count(lambda: teacher.encode_image(images))
        rows.append(("(reference) CLIP ViT-B/16 teacher forward", flops, seconds, f"{args.image}x{args.image}, random weights"))

    print(f"Pseudo-mask generators per image: dense grid {args.grid}x{args.grid}x{args.dim}, labels {args.image}^2, "
          f"{100 * args.annotated:.0f}% annotated, device {args.device}")  # fmt: skip
    print("| generator | GFLOPs | GMACs (fvcore) | seconds | notes |")
    print("|---|---|---|---|---|")
    for name, flops, seconds, note in rows:
        print(f"| {name} | {flops / 1e9:.2f} | {flops / 2e9:.2f} | {seconds:.2f} | {note} |")
    print("(paper, Table XII: Mask Proposal 17.6, Panoptic cut 16.5, Ours 17.7 GFLOPs; the paper does not say what they include)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
