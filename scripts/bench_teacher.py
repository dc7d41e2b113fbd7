"""Benchmark the teacher-side hot paths of CLIP-to-Seg, each against a straightforward version.

    python scripts/bench_teacher.py [--device cpu|cuda] [--parts abc]

(a) Pseudo masks for a batch of 16 images (32x32 token grid, 512-d): the batched on-device
    generator vs the plain per-image NumPy reference with the same seeds, iterations and merge;
    prints both times, the ratio, and whether the outputs match.
(b) Region CLS tokens, 10 regions per image, CLIP ViT-B/16 architecture (random weights, 512x512
    input): ``encode_regions`` batched vs one teacher call per region, for the ``masked_image``
    and ``crop`` (224) encoders, and the one-pass ``attention`` encoder against both.
(c) The teacher's share of one ``method=c2s`` training step at 512x512 with SegFormer-B4 and a
    ViT-B/16 teacher (batch 2): time inside ``teacher.encode_image`` / the whole step.
CPU runs use one thread; on a GPU everything runs in bf16 autocast.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.toolkit import encode_regions, generate_pseudo_masks


def _nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    # the source index torch's nearest interpolation picks: floor(dst * in / out)
    return np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int64)


def per_image_numpy_pseudo_masks(
    dense_features: np.ndarray,
    labels: np.ndarray,
    num_seen: int,
    ignore_index: int = 255,
    window_sizes: Sequence[int] = (3, 7),
    iterations: int = 10,
    threshold: float = 0.9,
    keep_singletons: bool = False,
) -> np.ndarray:
    """The straightforward per-image NumPy version of :func:`generate_pseudo_masks` (cosine
    distance): plain loops over windows, clusters and Algorithm 1. The straightforward version this
    benchmark times the batched one against (the tests keep their own independent reference).

    ``dense_features (D, h, w)`` and ``labels (H, W)`` of one image; returns ``Ỹ (H, W)``.
    """
    dim, grid_h, grid_w = dense_features.shape
    height, width = labels.shape
    grid_labels = labels[np.ix_(_nearest_indices(grid_h, height), _nearest_indices(grid_w, width))]
    unannotated = grid_labels == ignore_index
    features = (dense_features * unannotated).astype(np.float32)  # Eq. 2
    seeds = []
    for k in window_sizes:
        stride = max(k // 2, 1)
        for top in range(0, grid_h - k + 1, stride):
            for left in range(0, grid_w - k + 1, stride):
                seeds.append(features[:, top : top + k, left : left + k].reshape(dim, -1).mean(axis=1))
    centroids = np.stack(seeds).astype(np.float32)
    seed_valid = np.linalg.norm(centroids, axis=1) > 0

    def normalize(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    points = normalize(features.reshape(dim, -1).T)
    centroids = normalize(centroids)
    valid = unannotated.ravel()
    sizes = np.zeros(len(centroids))
    assignment = np.zeros(len(points), dtype=np.int64)
    for _ in range(max(iterations, 1)):
        similarity = points @ centroids.T
        similarity[:, ~seed_valid] = -np.inf
        assignment = similarity.argmax(axis=1)
        for cluster in range(len(centroids)):
            members = points[valid & (assignment == cluster)]
            sizes[cluster] = len(members)
            if len(members):
                centroids[cluster] = normalize(members.mean(axis=0))
    # Algorithm 1
    cluster_valid = sizes > 0
    similarity = centroids @ centroids.T
    similarity[~cluster_valid, :] = -np.inf
    similarity[:, ~cluster_valid] = -np.inf
    np.fill_diagonal(similarity, -np.inf)
    group = np.full(len(centroids), -1)
    groups = 0
    while similarity.max() >= threshold:
        row = int(np.argmax(similarity)) // len(centroids)
        members = similarity[row] > threshold
        members[row] = True
        group[members] = groups
        groups += 1
        similarity[members, :] = -np.inf
        similarity[:, members] = -np.inf
    if keep_singletons:
        for cluster in np.flatnonzero(cluster_valid & (group < 0)):
            group[cluster] = groups
            groups += 1
    point_group = np.where(valid, group[assignment], -1).reshape(grid_h, grid_w)
    latent = point_group[np.ix_(_nearest_indices(height, grid_h), _nearest_indices(width, grid_w))]
    latent = np.where(latent >= 0, latent + num_seen, ignore_index)
    return np.where(labels != ignore_index, labels, latent)


def timed(fn, device: str, repeats: int = 1) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times)), result


def scene_labels(batch: int, size: int, generator: torch.Generator, regions: int = 10) -> torch.Tensor:
    """Label maps with ``regions`` rectangles each; the first half seen classes, the rest ignore."""
    labels = torch.full((batch, size, size), 255)
    for b in range(batch):
        for r in range(regions):
            top, left = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
            labels[b, top : top + size // 4, left : left + size // 4] = r if r < regions // 2 else 255
    return labels


def bench_pseudo_masks(device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 512, 32, 32, generator=generator)
    features += 2 * torch.randn(16, 512, 1, 1, generator=generator) * (torch.rand(16, 1, 32, 32, generator=generator) > 0.5)
    labels = scene_labels(16, 512, generator)
    options = dict(window_sizes=(3, 7), iterations=10, threshold=0.9)
    batched_time, batched = timed(lambda: generate_pseudo_masks(features.to(device), labels.to(device), 5, **options), device, 3)
    started = time.perf_counter()
    reference = np.stack([per_image_numpy_pseudo_masks(features[i].numpy(), labels[i].numpy(), 5, **options) for i in range(16)])
    numpy_time = time.perf_counter() - started
    match = float((batched.cpu().numpy() == reference).mean())
    print(
        f"(a) pseudo masks, batch 16, 32x32x512: batched {batched_time * 1e3:.0f} ms, "
        f"NumPy per image {numpy_time * 1e3:.0f} ms, ratio {numpy_time / batched_time:.2f}x, "
        f"outputs equal on {100 * match:.2f}% of pixels"
    )


def bench_region_tokens(device: str, teacher: CLIPTeacher) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 512, 512, generator=generator, device="cpu").to(device)
    labels = torch.full((2, 512, 512), 255)
    for b in range(2):
        for r in range(10):  # ten disjoint horizontal bands
            labels[b, r * 51 : (r + 1) * 51] = r
    labels = labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    batched_times = {}
    for encoder in ("masked_image", "crop", "attention"):
        with autocast:
            batched_times[encoder], _ = timed(lambda: encode_regions(teacher, images, labels, encoder, crop_size=224), device)
            if encoder == "attention":  # one pass per image by construction: no per-region loop
                continue

            def per_region():
                for b in range(2):
                    for r in range(10):
                        single = torch.where(labels[b : b + 1] == r, labels[b : b + 1], torch.full_like(labels[b : b + 1], 255))
                        encode_regions(teacher, images[b : b + 1], single, encoder, crop_size=224)

            loop_time, _ = timed(per_region, device)
        print(
            f"(b) region CLS, {encoder:12s} 2 images x 10 regions: batched {batched_times[encoder]:.2f} s, "
            f"per region {loop_time:.2f} s, ratio {loop_time / batched_times[encoder]:.2f}x"
        )
    print(
        f"(b) region CLS, attention    2 images x 10 regions: {batched_times['attention']:.2f} s, "
        f"{batched_times['masked_image'] / batched_times['attention']:.1f}x faster than masked_image, "
        f"{batched_times['crop'] / batched_times['attention']:.1f}x faster than crop"
    )


def bench_c2s_step(device: str) -> None:
    from zeroseg.build import build_run
    from zeroseg.utils import compose_config

    cfg = compose_config(
        "train",
        ["method=c2s", "backbone=segformer_b4", "clip=vit_b16", "clip.pretrained=null", "clip.random_init=true",
         "dataset.train_dataset.scene.image_size=512", "dataset.batch_size=2", "dataset.train_dataset.num_images=4",
         "logger=none", "callbacks=minimal", "method.decoder_heads=8"],
        "/tmp/zeroseg_bench_teacher",
    )  # fmt: skip
    objects = build_run(cfg, with_callbacks=False)
    model, datamodule = objects["model"].to(device), objects["datamodule"]
    datamodule.setup("fit")
    batch = {k: v.to(device) for k, v in next(iter(datamodule.train_dataloader())).items()}
    teacher_seconds = []
    original = model.teacher.encode_image

    def spy(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        teacher_seconds.append(time.perf_counter() - started)
        return out

    model.teacher.encode_image = spy
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    model.train()

    def step():
        teacher_seconds.clear()
        with autocast:
            loss = model.training_losses(batch)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    step_time, _ = timed(step, device)
    teacher_time = sum(teacher_seconds)
    print(f"(c) c2s step, segformer_b4 + ViT-B/16 teacher, batch 2 at 512x512: {step_time:.2f} s, "
          f"teacher {teacher_time:.2f} s ({100 * teacher_time / step_time:.0f}% of the step)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab' ((c) is the slowest on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"device={args.device} threads=1")
    if "a" in args.parts:
        bench_pseudo_masks(args.device)
    if "b" in args.parts:
        bench_region_tokens(args.device, CLIPTeacher("ViT-B-16", random_init=True).to(args.device))
    if "c" in args.parts:
        bench_c2s_step(args.device)


if __name__ == "__main__":
    main()
