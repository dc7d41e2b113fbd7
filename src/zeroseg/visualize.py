"""See what a model does: per-class IoU tables, the unseen-class confusion, prediction overlays.

:class:`SegmentationVisuals` is a Lightning callback (``callbacks.visuals`` in
``conf/callbacks/default.yaml``). After every validation and after the test it reports

* a per-class IoU table (class, seen/unseen, IoU, ground-truth and predicted pixels), from the same
  dataset-level confusion matrix as ``val/hIoU`` (so the table and the scalars agree);
* the unseen-class confusion: for every unseen class, the fraction of its pixels predicted as each
  class (the ``top_k`` largest), and the fraction given to seen classes — the seen bias made visible;
* overlays (image, ground truth, prediction) of a fixed set of ``num_images`` images, the same
  images at every validation so a run's progress can be followed image by image.

With a W&B logger these go to W&B (``wandb.Image`` with masks and class labels, ``wandb.Table``),
offline too (``WANDB_MODE=offline``); without one (``files: auto``) they are written into the run
directory as PNG and CSV (``<run>/visuals/<stage>_step<N>/``). Under DDP every process takes part in
summing the confusion matrix; only rank 0 predicts the overlay images and writes anything.

The drawing helpers (:func:`class_colours`, :func:`colourize`, :func:`legend`, ...) are shared with
:mod:`zeroseg.predict`.
"""

from __future__ import annotations

import colorsys
import csv
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from zeroseg.metrics import summarize_confusion
from zeroseg.utils.atomic import atomic_output, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "SegmentationVisuals",
    "class_colours",
    "colourize",
    "comparison_panel",
    "legend",
    "overlay",
    "per_class_rows",
    "unseen_confusion_rows",
    "write_csv",
    "write_png",
]

STAGES = ("val", "test")
FILE_MODES = ("auto", True, False)
PER_CLASS_COLUMNS = ("class_id", "class", "split", "iou", "gt_pixels", "pred_pixels")
CONFUSION_COLUMNS = (
    "unseen_class", "gt_pixels", "correct", "to_seen", "rank", "predicted_as", "predicted_split", "fraction",
)  # fmt: skip


# -- colours and drawing ---------------------------------------------------------------------------
def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours, the same for a class id in every picture and every run.

    Hues step by the golden angle, so neighbouring ids (often related classes) get distant hues;
    saturation and brightness alternate so that more than a dozen classes stay apart.
    """
    colours = np.zeros((max(num_classes, 0), 3), dtype=np.uint8)
    for class_id in range(num_classes):
        hue = (class_id * 0.381966) % 1.0
        saturation = (0.85, 0.55, 1.0)[class_id % 3]
        value = (0.95, 0.75)[(class_id // 3) % 2]
        colours[class_id] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def colourize(mask: np.ndarray, colours: np.ndarray, ignore_index: Optional[int] = None) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 picture of a class-id map; ignored (and unknown) ids are black."""
    picture = np.zeros((*mask.shape, 3), dtype=np.uint8)
    known = (mask >= 0) & (mask < len(colours))
    if ignore_index is not None:
        known &= mask != ignore_index
    picture[known] = colours[mask[known]]
    return picture


def to_uint8_image(image: Tensor | np.ndarray) -> np.ndarray:
    """``(3, H, W)`` floats in ``[0, 1]`` (a dataset item) or ``(H, W, 3)`` uint8 → ``(H, W, 3)`` uint8."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
        return (image * 255 + 0.5).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def overlay(
    image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.5, ignore_index: Optional[int] = None
) -> np.ndarray:
    """The image with the class colours of ``mask`` blended in (ignored pixels left as they are)."""
    coloured = colourize(mask, colours, ignore_index).astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + coloured * alpha
    if ignore_index is not None:
        blended[mask == ignore_index] = image[mask == ignore_index]
    return (blended + 0.5).clip(0, 255).astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, font_size: int = 12) -> Image.Image:
    """A white strip ``width`` pixels wide listing ``(text, colour)`` entries as swatch + text, wrapped into rows."""
    font = _font(font_size)
    swatch, gap, line = font_size, 6, font_size + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    positions: list[tuple[int, int]] = []
    x, y = gap, gap
    for text, _ in entries:
        item_width = swatch + 4 + int(measure.textlength(text, font=font)) + 2 * gap
        if x > gap and x + item_width > width:
            x, y = gap, y + line
        positions.append((x, y))
        x += item_width
    strip = Image.new("RGB", (width, y + line + gap if entries else 0), "white")
    draw = ImageDraw.Draw(strip)
    for (text, colour), (x, y) in zip(entries, positions):
        draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + swatch + 4, y), text, fill="black", font=font)
    return strip


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def comparison_panel(
    image: np.ndarray,
    target: Optional[np.ndarray],
    prediction: np.ndarray,
    class_names: Sequence[str],
    colours: np.ndarray,
    unseen_class_ids: Sequence[int] = (),
    ignore_index: int = 255,
    title: str = "",
    min_side: int = 160,
    alpha: float = 0.75,
) -> Image.Image:
    """Image | ground truth | prediction side by side with headers and a legend of the classes shown
    (unseen ones marked): the PNG written when W&B is off. Small images are enlarged (whole pixels)
    to ``min_side`` so that the panels stay readable next to their headers; ``alpha`` is the weight of the
    class colours over the image."""
    factor = -(-min_side // max(image.shape[:2])) if max(image.shape[:2]) < min_side else 1
    if factor > 1:  # nearest neighbour: every pixel stays a block of one class
        image = image.repeat(factor, 0).repeat(factor, 1)
        prediction = prediction.repeat(factor, 0).repeat(factor, 1)
        target = None if target is None else target.repeat(factor, 0).repeat(factor, 1)
    panels = [("image", image)]
    if target is not None:
        panels.append(("ground truth", overlay(image, target, colours, alpha, ignore_index)))
    panels.append(("prediction", overlay(image, prediction, colours, alpha)))
    height, width = image.shape[:2]
    font = _font(12)
    header = 18
    row = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * 4, height + header), "white")
    draw = ImageDraw.Draw(row)
    for k, (name, picture) in enumerate(panels):
        row.paste(Image.fromarray(picture), (k * (width + 4), header))
        draw.text((k * (width + 4) + 2, 2), name, fill="black", font=font)
    shown = np.unique(np.concatenate([prediction.ravel(), target.ravel() if target is not None else []]))
    unseen = set(unseen_class_ids)
    entries = [
        (class_names[c] + (" (unseen)" if c in unseen else ""), tuple(colours[c]))
        for c in shown.astype(int).tolist()
        if 0 <= c < len(class_names)
    ]
    parts = [row, legend(entries, row.width)]
    if title:
        caption = Image.new("RGB", (row.width, header), "white")
        ImageDraw.Draw(caption).text((2, 2), title, fill="black", font=font)
        parts.insert(0, caption)
    return _stack(parts)


def write_png(path: Path, picture: Image.Image) -> None:
    """A PNG written atomically (no half-written picture if the run is killed)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    with atomic_output(path, what="picture") as handle:
        handle.write(buffer.getvalue())


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue(), what="table")


# -- tables from a confusion matrix -------------------------------------------------------------------
def per_class_rows(confmat: Tensor, class_names: Sequence[str], unseen_class_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One row per class: id, name, ``seen``/``unseen``, IoU in percent (``None`` where the class is in
    neither ground truth nor prediction: no IoU, as in the metric), ground-truth and predicted pixels."""
    confmat = confmat.detach().cpu()
    iou = summarize_confusion(confmat, list(unseen_class_ids))["per_class_iou"]  # the metric's own numbers
    gt_pixels, pred_pixels = confmat.sum(1), confmat.sum(0)
    unseen = set(unseen_class_ids)
    return [
        {
            "class_id": c,
            "class": name,
            "split": "unseen" if c in unseen else "seen",
            "iou": None if bool(iou[c].isnan()) else float(iou[c]),
            "gt_pixels": int(gt_pixels[c]),
            "pred_pixels": int(pred_pixels[c]),
        }
        for c, name in enumerate(class_names)
    ]


def unseen_confusion_rows(
    confmat: Tensor, class_names: Sequence[str], unseen_class_ids: Sequence[int], top_k: int = 3
) -> list[dict[str, Any]]:
    """For each unseen class in the ground truth: the ``top_k`` classes its pixels are predicted as
    (largest fraction first; only classes that got any), with its pixel count, the fraction predicted
    correctly and the fraction predicted as any seen class repeated on each of its rows (long format,
    one table for W&B and CSV)."""
    confmat = confmat.detach().cpu().double()
    unseen = set(unseen_class_ids)
    seen_ids = [c for c in range(len(class_names)) if c not in unseen]
    rows: list[dict[str, Any]] = []
    for u in sorted(unseen):
        total = float(confmat[u].sum())
        if total == 0:
            continue  # not in this split's ground truth: nothing to say
        fractions = confmat[u] / total
        order = sorted(range(len(class_names)), key=lambda c: (-float(fractions[c]), c))
        common = {
            "unseen_class": class_names[u],
            "gt_pixels": int(total),
            "correct": float(fractions[u]),
            # counts summed before dividing: an all-seen class reads 1.0, not 0.9999999999999999
            "to_seen": float(confmat[u, seen_ids].sum() / total) if seen_ids else 0.0,
        }
        for rank, c in enumerate([c for c in order if fractions[c] > 0][:top_k], start=1):
            rows.append(
                {
                    **common,
                    "rank": rank,
                    "predicted_as": class_names[c],
                    "predicted_split": "unseen" if c in unseen else "seen",
                    "fraction": float(fractions[c]),
                }
            )
    return rows


def _spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)``: a fixed, varied sample of a split."""
    if length <= 0 or count <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, length - 1, min(count, length))})


def _downscale(
    image: np.ndarray, masks: Sequence[Optional[np.ndarray]], max_side: int
) -> tuple[np.ndarray, list[Optional[np.ndarray]]]:
    """Shrink a large picture (real test images) so panels stay small; masks by nearest neighbour."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if not max_side or scale >= 1:
        return image, list(masks)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    resized = [
        None if m is None else np.asarray(Image.fromarray(m.astype(np.int32)).resize(size, Image.NEAREST)).astype(m.dtype)
        for m in masks
    ]
    return small, resized


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _dataset_of(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


# -- the callback ------------------------------------------------------------------------------------
class SegmentationVisuals(L.Callback):
    """Per-class IoU, unseen-class confusion and prediction overlays after every validation and test.

    Args:
        num_images: images shown at every validation (and test): evenly spread over the split, the
            same ones every time; 0 switches the overlays off (the tables stay).
        top_k: classes listed per unseen class in the confusion summary.
        files: write PNG/CSV into ``output_dir``: ``auto`` (default) when the run has no W&B logger,
            ``true`` always, ``false`` never.
        output_dir: where the PNG/CSV go, one folder ``<stage>_step<N>`` per report.
        max_side: overlays of larger images are shrunk to this many pixels on their long side.
        stages: which of ``val``/``test`` to report.

    The callback reads the method's ``val_metric``/``test_metric`` (its confusion matrix, summed over
    DDP processes) before the method resets it, and predicts the overlay images with the method's
    own :meth:`~zeroseg.methods.base.ZSSMethod.segment` (the evaluation path, including sliding windows).
    """

    def __init__(
        self,
        num_images: int = 4,
        top_k: int = 3,
        files: str | bool = "auto",
        output_dir: Optional[str] = None,
        max_side: int = 512,
        stages: Sequence[str] = STAGES,
    ) -> None:
        super().__init__()
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
            raise ValueError(f"callbacks.visuals.num_images must be a whole number >= 0, got {num_images!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"callbacks.visuals.top_k must be a whole number >= 1, got {top_k!r}")
        if files not in FILE_MODES:
            raise ValueError(f"callbacks.visuals.files={files!r}: expected auto, true or false")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"callbacks.visuals.stages has unknown stage(s) {unknown}; allowed: {list(STAGES)}")
        if files is True and output_dir is None:
            raise ValueError("callbacks.visuals.files=true needs callbacks.visuals.output_dir")
        self.num_images = num_images
        self.top_k = top_k
        self.files = files
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_side = max_side
        self.stages = tuple(stages)
        # what the latest report produced, per stage (tests and notebooks read it)
        self.last_report: dict[str, dict[str, Any]] = {}

    # -- hooks ---------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val" not in self.stages:
            return
        self._report(trainer, pl_module, "val", pl_module.val_metric, _dataset_of(trainer.val_dataloaders))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" not in self.stages:
            return
        self._report(trainer, pl_module, "test", pl_module.test_metric, _dataset_of(trainer.test_dataloaders))

    # -- the report ----------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: Any, stage: str, metric: Any, dataset: Any) -> None:
        # a collective under DDP: every process sums its confusion matrix in, then gets its own back
        with metric.sync_context():
            confmat = metric.confmat.detach().clone().cpu()
        if not trainer.is_global_zero:
            return
        class_names = list(pl_module.class_names)
        unseen_ids = list(pl_module.unseen_class_ids)
        per_class = per_class_rows(confmat, class_names, unseen_ids)
        confusion = unseen_confusion_rows(confmat, class_names, unseen_ids, self.top_k)
        samples = self._predict_samples(trainer, pl_module, dataset)
        step = int(trainer.global_step)
        report: dict[str, Any] = {"step": step, "per_class": per_class, "unseen_confusion": confusion, "samples": samples}

        wandb_loggers = _wandb_loggers(trainer)
        for logger in wandb_loggers:
            self._log_wandb(logger, stage, step, per_class, confusion, samples, class_names, unseen_ids, pl_module.ignore_index)
        if self.files is True or (self.files == "auto" and not wandb_loggers):
            if self.output_dir is None:
                log.warning("callbacks.visuals: no output_dir, so the %s tables and overlays are not written", stage)
            else:
                report["dir"] = self._write_files(
                    stage, step, per_class, confusion, samples, class_names, unseen_ids, pl_module.ignore_index
                )
        self.last_report[stage] = report

    @torch.no_grad()
    def _predict_samples(self, trainer: L.Trainer, pl_module: Any, dataset: Any) -> list[dict[str, Any]]:
        if self.num_images == 0 or dataset is None:
            return []
        samples = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for index in _spread_indices(len(dataset), self.num_images):
                item = dataset[index]
                image, label = item["image"], item.get("label")
                # evaluated as the metric does: at the label's size (real test labels keep their original
                # size while the image is resized), the image resized to match for the panels
                size = tuple(label.shape[-2:]) if label is not None else tuple(image.shape[-2:])
                with trainer.precision_plugin.val_step_context():
                    logits = pl_module.segment(image[None].to(pl_module.device), size)
                prediction = logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)
                picture = to_uint8_image(image)
                if picture.shape[:2] != size:
                    picture = np.asarray(Image.fromarray(picture).resize((size[1], size[0]), Image.BILINEAR))
                target = None if label is None else label.cpu().numpy().astype(np.int64)
                picture, (target, prediction) = _downscale(picture, [target, prediction], self.max_side)
                samples.append({"index": index, "image": picture, "target": target, "prediction": prediction})
        finally:
            pl_module.train(was_training)
        return samples

    def _log_wandb(
        self,
        logger: Any,
        stage: str,
        step: int,
        per_class: list[dict[str, Any]],
        confusion: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        class_names: Sequence[str],
        unseen_ids: Sequence[int],
        ignore_index: int,
    ) -> None:
        import wandb

        unseen = set(unseen_ids)
        labels = {c: name + (" (unseen)" if c in unseen else "") for c, name in enumerate(class_names)}
        payload: dict[str, Any] = {
            f"{stage}/per_class_iou": wandb.Table(
                columns=list(PER_CLASS_COLUMNS), data=[[row[c] for c in PER_CLASS_COLUMNS] for row in per_class]
            ),
            f"{stage}/unseen_confusion": wandb.Table(
                columns=list(CONFUSION_COLUMNS), data=[[row[c] for c in CONFUSION_COLUMNS] for row in confusion]
            ),
        }
        if samples:
            images = []
            for sample in samples:
                masks = {"prediction": {"mask_data": sample["prediction"].astype(np.int32), "class_labels": labels}}
                if sample["target"] is not None:
                    # W&B's mask viewer needs a label for every value, ignore included
                    masks["ground_truth"] = {
                        "mask_data": sample["target"].astype(np.int32),
                        "class_labels": {**labels, ignore_index: "ignore"},
                    }
                images.append(wandb.Image(sample["image"], masks=masks, caption=f"{stage} image {sample['index']}"))
            payload[f"{stage}/overlays"] = images
        # log_metrics adds trainer/global_step, the x axis Lightning defines for every W&B panel
        logger.log_metrics(payload, step=step)

    def _write_files(
        self,
        stage: str,
        step: int,
        per_class: list[dict[str, Any]],
        confusion: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        class_names: Sequence[str],
        unseen_ids: Sequence[int],
        ignore_index: int,
    ) -> Path:
        assert self.output_dir is not None
        folder = self.output_dir / f"{stage}_step{step:06d}"
        write_csv(folder / "per_class_iou.csv", PER_CLASS_COLUMNS, per_class)
        write_csv(folder / "unseen_confusion.csv", CONFUSION_COLUMNS, confusion)
        colours = class_colours(len(class_names))
        for sample in samples:
            panel = comparison_panel(
                sample["image"], sample["target"], sample["prediction"], class_names, colours, unseen_ids, ignore_index,
                title=f"{stage} image {sample['index']}, step {step}",
            )  # fmt: skip
            write_png(folder / f"overlay_{sample['index']:05d}.png", panel)
        log.info("%s visuals at step %d: %s", stage, step, folder)
        return folder
