"""Benchmark: images/s of one loader worker for each benchmark's training (and test) pipeline.

    python scripts/bench_data.py [--data-dir <paths.data_dir>] [--images 48] [--datasets voc coco_stuff ...]

Without ``--data-dir`` it writes a stand-in tree per dataset in a temporary folder, in the real
layout with the real image sizes (VOC / Context 500x375, COCO 640x480, ADE 683x512 JPEGs of smooth
random content, PNG labels of class regions) — decoding cost depends on size and entropy, so real
photographs decode at a similar rate. With ``--data-dir`` it reads your real data.

For each dataset it times ``dataset[i]`` (decode + label check + the papers' training pipeline) in
this single process and thread — one loader worker — and compares with a straightforward pipeline
that converts to float first, resizes the whole image with ``F.interpolate`` before cropping and
distorts colours with float tensor ops (a torch HSV round trip).
A GPU step of a B4 student at batch 16 takes ~0.5 s, i.e. it consumes ~32 images/s: the loader
keeps up when workers x images/s exceeds that.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zeroseg.data import ADE20KSegmentation, COCOStuffSegmentation, PascalContext, VOCSegmentation
from zeroseg.data.folders import SegmentationFolder
from zeroseg.data.transforms import EvalTransform, PhotoMetricDistortion, TrainTransform, keep_ratio_size, random_crop_box

SIZES = {"voc": (375, 500), "coco_stuff": (480, 640), "context59": (375, 500), "ade150": (512, 683)}


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    coarse = rng.integers(0, 256, (size[0] // 16 + 1, size[1] // 16 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC)).astype(np.int16)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def region_label(rng: np.random.Generator, size: tuple[int, int], values: list[int], background: int) -> np.ndarray:
    label = np.full(size, background, dtype=np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        label[top : top + rng.integers(40, size[0] // 2), left : left + rng.integers(40, size[1] // 2)] = rng.choice(values)
    return label


def write_stand_in(name: str, data_dir: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    size = SIZES[name]
    ids = [f"{i:06d}" for i in range(count)]

    def save(image_path: Path, label_path: Path, values: list[int], background: int) -> None:
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(rng, size)).save(image_path, quality=90)
        Image.fromarray(region_label(rng, size, values, background)).save(label_path)

    if name == "voc":
        root = data_dir / "VOCdevkit/VOC2012"
        for i in ids:
            save(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClassAug" / f"{i}.png", list(range(1, 21)), 0)
        (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(ids))
    elif name == "coco_stuff":
        root = data_dir / "coco_stuff164k"
        for i in ids:
            save(
                root / "images/train2017" / f"{i}.jpg",
                root / "annotations/train2017" / f"{i}_labelTrainIds.png",
                list(range(171)),
                255,
            )
    elif name == "context59":
        root = data_dir / "VOCdevkit/VOC2010"
        for i in ids:
            save(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClassContext" / f"{i}.png", list(range(1, 60)), 0)
        (root / "ImageSets/SegmentationContext").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/SegmentationContext/train.txt").write_text("\n".join(ids))
    else:
        root = data_dir / "ADEChallengeData2016"
        for i in ids:
            save(root / "images/training" / f"{i}.jpg", root / "annotations/training" / f"{i}.png", list(range(1, 151)), 0)


READERS: dict[str, Callable[..., SegmentationFolder]] = {
    "voc": VOCSegmentation,
    "coco_stuff": COCOStuffSegmentation,
    "context59": lambda d, s, **kw: PascalContext(d, s, num_classes=59, **kw),
    "ade150": ADE20KSegmentation,
}


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(0)
    maxc, minc = rgb.max(dim=0).values, rgb.min(dim=0).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    saturation = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return torch.stack([torch.where(delta > 0, hue / 6, torch.zeros_like(hue)) % 1.0, saturation, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(0)
    k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + hue * 6) % 6
    return value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def float_photometric(image: torch.Tensor) -> torch.Tensor:
    """PhotoMetricDistortion's steps on a float tensor with a torch HSV round trip."""
    if float(torch.rand(())) < 0.5:
        image = (image + (torch.rand(()) - 0.5) * 64 / 255).clamp(0, 1)
    if float(torch.rand(())) < 0.5:
        image = (image * (0.5 + torch.rand(()))).clamp(0, 1)
    if float(torch.rand(())) < 0.75:
        hsv = rgb_to_hsv(image)
        hsv[1] = (hsv[1] * (0.5 + torch.rand(()))).clamp(0, 1)
        hsv[0] = (hsv[0] + (torch.rand(()) - 0.5) * 0.2) % 1.0
        image = hsv_to_rgb(hsv).clamp(0, 1)
    return image


def straightforward_train(image: np.ndarray, label: np.ndarray, crop: int = 512) -> dict[str, torch.Tensor]:
    """Float first, resize the whole image with F.interpolate, then crop/flip/distort/pad."""
    image_t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    label_t = torch.from_numpy(np.array(label))[None, None].float()
    ratio = 0.5 + 1.5 * float(torch.rand(()))
    size = keep_ratio_size(*label.shape, [math.floor(2048 * ratio), math.floor(512 * ratio)])
    image_t = F.interpolate(image_t, size=size, mode="bilinear", align_corners=False)[0]
    label_t = F.interpolate(label_t, size=size, mode="nearest")[0, 0].to(torch.uint8)
    top, left, h, w = random_crop_box(label_t.numpy(), (crop, crop), 0.75, 255)
    image_t, label_t = image_t[:, top : top + h, left : left + w], label_t[top : top + h, left : left + w]
    if float(torch.rand(())) < 0.5:
        image_t, label_t = image_t.flip(-1), label_t.flip(-1)
    image_t = float_photometric(image_t.clamp(0, 1))
    image_t = F.pad(image_t, (0, crop - w, 0, crop - h))
    label_t = F.pad(label_t.long(), (0, crop - w, 0, crop - h), value=255)
    return {"image": image_t, "label": label_t}


def rate(fn: Callable[[int], object], count: int, repeats: int) -> float:
    """Median images/s over ``repeats`` passes of ``count`` items."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        rates.append(count / (time.perf_counter() - start))
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="real data (paths.data_dir); default: stand-in trees")
    parser.add_argument("--datasets", nargs="+", default=list(READERS), choices=list(READERS))
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        print(
            "| dataset | image size | train pipeline (img/s/worker) | straightforward (img/s) | ratio | test pipeline (img/s) |"
        )
        print("|---|---|---|---|---|---|")
        for name in args.datasets:
            data_dir = args.data_dir or Path(tmp)
            if args.data_dir is None:
                write_stand_in(name, data_dir, args.images)
            train = READERS[name](
                data_dir, "train", transform=TrainTransform(photometric=PhotoMetricDistortion()), limit=args.images
            )
            raw = READERS[name](data_dir, "train", limit=args.images)
            evaluation = READERS[name](data_dir, "train", transform=EvalTransform(), limit=args.images)
            count = len(train)
            ours = rate(lambda i: train[i], count, args.repeats)
            plain = rate(lambda i: straightforward_train(*raw.read_pair(i)), count, args.repeats)
            test = rate(lambda i: evaluation[i], count, args.repeats)
            size = "x".join(str(s) for s in reversed(raw.read_pair(0)[0].shape[:2]))
            print(f"| {name} | {size} | {ours:.1f} | {plain:.1f} | {ours / plain:.2f}x | {test:.1f} |", flush=True)


if __name__ == "__main__":
    main()
