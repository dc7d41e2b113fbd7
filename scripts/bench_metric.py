"""Benchmark: HarmonicIoU.update (one bincount per batch) vs a straightforward per-class loop and vs
torchmetrics' MulticlassJaccardIndex (per-class IoU, ignore_index) on the same data.

    python scripts/bench_metric.py [--device cpu|cuda] [--classes 171] [--batch 8] [--size 512]

Prints the median time per update of both and their ratio. Uses one thread on CPU so numbers
are comparable on a shared machine.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark
from torchmetrics.classification import MulticlassJaccardIndex

from zeroseg.metrics import HarmonicIoU


def per_class_loop_update(confmat_rows: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """The straightforward way: for every class, count TP/FP/FN with boolean masks."""
    valid = target != ignore_index
    for c in range(confmat_rows.shape[0]):
        is_pred, is_true = (preds == c) & valid, (target == c) & valid
        confmat_rows[c, 0] += (is_pred & is_true).sum()
        confmat_rows[c, 1] += (is_pred & ~is_true).sum()
        confmat_rows[c, 2] += (~is_pred & is_true).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size)
    target = torch.randint(args.classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.1] = 255
    preds = torch.randint(args.classes, shape, generator=generator)
    target, preds = target.to(device), preds.to(device)

    metric = HarmonicIoU(args.classes, list(range(args.classes - 15, args.classes))).to(device)
    rows = torch.zeros(args.classes, 3, dtype=torch.long, device=device)
    jaccard = MulticlassJaccardIndex(args.classes, average="none", ignore_index=255).to(device)
    timers = {
        "HarmonicIoU.update (bincount)": benchmark.Timer(
            "metric.update(preds, target)", globals={"metric": metric, "preds": preds, "target": target}
        ),
        "torchmetrics MulticlassJaccardIndex": benchmark.Timer(
            "jaccard.update(preds, target)", globals={"jaccard": jaccard, "preds": preds, "target": target}
        ),
        "per-class loop": benchmark.Timer(
            "loop(rows, preds, target, 255)",
            globals={"loop": per_class_loop_update, "rows": rows, "preds": preds, "target": target},
        ),
    }
    medians = {}
    print(f"device={device} classes={args.classes} batch={args.batch} size={args.size}x{args.size} threads=1")
    for name, timer in timers.items():
        measurement = timer.blocked_autorange(min_run_time=args.min_run_time)
        medians[name] = measurement.median
        print(f"{name:32s} {measurement.median * 1e3:9.2f} ms per batch")
    ratio = medians["per-class loop"] / medians["HarmonicIoU.update (bincount)"]
    print(f"speed-up of HarmonicIoU.update over the per-class loop: {ratio:.1f}x")
    ratio = medians["torchmetrics MulticlassJaccardIndex"] / medians["HarmonicIoU.update (bincount)"]
    print(f"speed-up of HarmonicIoU.update over torchmetrics' MulticlassJaccardIndex.update: {ratio:.2f}x")

    # both count the same pixels
    metric.reset()
    rows.zero_()
    metric.update(preds, target)
    per_class_loop_update(rows, preds, target, 255)
    confmat = metric.confmat
    tp = confmat.diag()
    assert torch.equal(tp, rows[:, 0]) and torch.equal(confmat.sum(0) - tp, rows[:, 1])
    # and the same per-class IoU as torchmetrics (classes present somewhere)
    jaccard.reset()
    jaccard.update(preds, target)
    union = confmat.sum(0) + confmat.sum(1) - tp
    present = union > 0
    ours = tp[present].double() / union[present].double()
    assert torch.allclose(ours, jaccard.compute()[present].double().cpu().to(ours.device), atol=1e-6)


if __name__ == "__main__":
    main()
