"""``python -m zeroseg.predict ckpt_path=... inputs=<file|dir|glob> 'classes="cat,dog"'``: segment your
own images into your own classes.

Open-vocabulary use of any trained method: the class names are turned into text embeddings on the
fly by the checkpoint's CLIP teacher (and cached like the training classes), and every pixel gets
the class whose embedding its dense features match best. Class names the checkpoint never saw in
training are the point — that is what zero-shot segmentation is for.

``predict(cfg)`` is a plain function (tests call it); ``main`` is the thin Hydra entry point. Give
the training run's ``method=/backbone=/clip=`` choices (as for ``zeroseg.eval``); the checkpoint is
checked against them. Writes into the run directory (``logs/predict/runs/<timestamp>/``, or
``output_dir=``):

* ``overlays/<image>.png`` — the image with its predicted classes in colour, and a legend of the
  classes present with their share of the pixels (images under 256 pixels are enlarged);
* ``maps/<image>.png`` (``save_maps=true``) — the class id of every pixel (8-bit, 16-bit beyond 255
  classes), ids as in ``classes.txt``;
* ``classes.txt`` (one ``id name`` per line) and ``predictions.json`` (per image: the files written
  and the classes found).

Large images: ``inference=slide`` (windows of ``inference.crop_size`` every ``inference.stride``),
and ``resize_short_side=N`` to bring images to the scale the model was trained at. Evaluation-time
calibrations tied to a benchmark's unseen split (Chimera-Seg's γ) are not applied: your classes have
no such split.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from zeroseg.build import build_run, check_checkpoint_fits, check_checkpoint_path
from zeroseg.inference import resize_logits
from zeroseg.methods.base import ZSSMethod, warn_identical_embeddings
from zeroseg.utils import save_resolved_config, task_wrapper, warn_unknown_keys
from zeroseg.utils.atomic import atomic_output, atomic_write_text
from zeroseg.utils.console import quiet_known_noise
from zeroseg.visualize import class_colours, legend, overlay, write_png

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "load_image",
    "main",
    "open_vocabulary_logits",
    "parse_class_names",
    "predict",
    "resolve_inputs",
]

# what a directory or a glob is searched for (explicitly named files are read whatever their suffix)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# overlays of smaller images are enlarged to this long side (the maps keep the image's own size)
MIN_OVERLAY_SIDE = 256


# -- what the user gives -------------------------------------------------------------------------------
def _read_class_file(path: str, key: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such class-name file (expected one class name per line)")
    # one name per line: real class names may contain commas ("wall, brick"); '#' starts a comment line
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if not line.strip().startswith("#")]


def parse_class_names(classes: Any, classes_file: Optional[str] = None) -> list[str]:
    """The class names of ``classes`` — a comma-separated string, a list, or ``@file.txt`` — or of
    ``classes_file`` (one name per line); blank entries are dropped. Errors name the value given."""
    if classes is not None and classes_file is not None:
        raise ValueError(f"give either classes= or classes_file=, not both (classes={classes!r}, classes_file={classes_file!r})")
    if classes_file is not None:
        names = _read_class_file(str(classes_file), "classes_file")
        given = f"classes_file={classes_file!r}"
    elif isinstance(classes, str):
        text = classes.strip()
        names = _read_class_file(text[1:], "classes") if text.startswith("@") else text.split(",")
        given = f"classes={classes!r}"
    elif isinstance(classes, (list, tuple, ListConfig)):
        names = [str(name) for name in classes]
        given = f"classes={list(classes)!r}"
    elif classes is None:
        raise ValueError(
            "no classes given: add 'classes=\"cat,dog,grass\"' (quoted: Hydra reads a bare comma as a sweep), "
            "classes=[cat,dog,grass], classes=@names.txt or classes_file=names.txt (one name per line)"
        )
    else:
        raise TypeError(f"classes={classes!r}: expected a comma-separated string, a list or @file.txt")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"{given} holds no class names; give at least one, e.g. 'classes=\"cat,dog\"'")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{given} names {duplicates} more than once; each class must be named once")
    return names


def resolve_inputs(inputs: Any) -> list[Path]:
    """The image files named by ``inputs``: a file, a directory (its images, not recursive), a glob
    (``**`` recurses) or a list of these; sorted within each entry, each file once."""
    if inputs is None or (isinstance(inputs, str) and not inputs.strip()):
        raise ValueError(
            "no inputs given: add inputs=<image file | directory | glob>, e.g. inputs=photos/ or 'inputs=photos/*.jpg'"
        )
    entries = [str(e) for e in inputs] if isinstance(inputs, (list, tuple, ListConfig)) else [str(inputs)]
    found: dict[Path, None] = {}
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"inputs={entry!r}: the directory holds no images ({', '.join(IMAGE_SUFFIXES)})")
        else:
            matches = sorted(
                Path(p)
                for p in glob.glob(str(path), recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
            if not matches:
                what = "no image matched this pattern" if glob.has_magic(entry) else "no such file or directory"
                raise FileNotFoundError(f"inputs={entry!r}: {what}")
        found.update(dict.fromkeys(matches))
    return list(found)


def load_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB, upright as its EXIF orientation says; a ``ValueError``
    naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))  # a writable copy: torch wraps it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"inputs: cannot read image {str(path)!r} ({type(error).__name__}: {error})") from error


def _check_images_open(paths: Sequence[Path]) -> None:
    # headers only (cheap): a non-image among thousands fails before the model is built, not halfway
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"inputs: cannot read image {str(path)!r} ({type(error).__name__}: {error})") from error


# -- the model -------------------------------------------------------------------------------------------
def open_vocabulary_logits(model: ZSSMethod, images: Tensor, class_embeddings: Tensor) -> Tensor:
    """Logits ``(B, len(class_embeddings), H, W)`` of ``images`` against any class embeddings, by the
    method's configured inference (whole image or sliding windows), at the input resolution.

    The same path as :meth:`ZSSMethod.segment`, which is bound to the dataset's classes, without its
    ``calibrate_logits`` (a shift of the benchmark's unseen classes, undefined for other classes).
    """
    return resize_logits(model.inference(lambda x: model.predict_logits(x, class_embeddings), images), images.shape[-2:])


def _load_model(cfg: DictConfig, ckpt_path: Optional[str]) -> dict[str, Any]:
    objects = build_run(cfg, with_callbacks=False)
    model: ZSSMethod = objects["model"]
    if ckpt_path is None:
        if model.trainable:
            raise ValueError(f"predict with method {type(model).__name__} needs ckpt_path=<checkpoint file of a training run>")
    else:
        checkpoint = check_checkpoint_fits(ckpt_path, model)
        model.on_load_checkpoint(checkpoint)  # puts the configured teacher's weights back (never checkpointed)
        model.load_state_dict(checkpoint["state_dict"])
    if type(model).calibrate_logits is not ZSSMethod.calibrate_logits or getattr(model, "calibration", 0.0) != 0.0:
        log.info(
            "%s's evaluation-time calibration of its benchmark's unseen classes is not applied to your classes",
            type(model).__name__,
        )
    trainer = objects["trainer"]
    model.to(trainer.strategy.root_device).eval()
    return objects


def _output_names(paths: Sequence[Path]) -> list[str]:
    """A file name per input: its stem, with ``_2``, ``_3``... for stems met before (dir1/a.png, dir2/a.jpg)."""
    names, used = [], set()
    for path in paths:
        name, k = path.stem, 1
        while name in used:
            k += 1
            name = f"{path.stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def _write_map(path: Path, class_map: np.ndarray, num_classes: int) -> None:
    import io

    mode_dtype = np.uint8 if num_classes <= 256 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(class_map.astype(mode_dtype)).save(buffer, format="PNG")
    with atomic_output(path, what="class map") as handle:
        handle.write(buffer.getvalue())


def _overlay_with_legend(
    image: np.ndarray, class_map: np.ndarray, class_names: Sequence[str], colours: np.ndarray, alpha: float
) -> Image.Image:
    counts = np.bincount(class_map.ravel(), minlength=len(class_names))
    present = [c for c in np.argsort(-counts, kind="stable").tolist() if counts[c] > 0]
    entries = [(f"{class_names[c]} {100 * counts[c] / class_map.size:.1f}%", tuple(colours[c])) for c in present]
    blended = overlay(image, class_map, colours, alpha)
    if max(blended.shape[:2]) < MIN_OVERLAY_SIDE:  # tiny images (the toy world) grow by whole pixels to stay legible
        factor = -(-MIN_OVERLAY_SIDE // max(blended.shape[:2]))
        blended = blended.repeat(factor, 0).repeat(factor, 1)
    picture = Image.fromarray(blended)
    strip = legend(entries, max(picture.width, 240))
    out = Image.new("RGB", (max(picture.width, strip.width), picture.height + strip.height), "white")
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled or total < 2
    )


# -- the entry points ------------------------------------------------------------------------------------
@task_wrapper
def predict(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment ``cfg.inputs`` into ``cfg.classes``; write overlays (and maps); return (summary, objects).

    The summary holds ``output_dir``, ``class_names`` and, per image, ``input``, ``overlay``, ``map``
    (or ``None``) and ``classes`` (name → share of the pixels).
    """
    warn_unknown_keys(cfg, "predict")
    # everything a user types is checked before the model is built
    class_names = parse_class_names(cfg.get("classes"), cfg.get("classes_file"))
    paths = resolve_inputs(cfg.get("inputs"))
    ckpt_path = check_checkpoint_path(cfg.get("ckpt_path"))
    short_side = cfg.get("resize_short_side")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise ValueError(f"resize_short_side={short_side!r}: expected a whole number of pixels >= 1, or null")
    _check_images_open(paths)

    output_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    save_resolved_config(cfg)
    objects = _load_model(cfg, ckpt_path)
    model: ZSSMethod = objects["model"]
    trainer = objects["trainer"]
    device = trainer.strategy.root_device
    with torch.no_grad():  # the method's own classifier: the teacher's text tower, or a learnt text context
        embeddings = model.open_vocabulary_embeddings(class_names)
    warn_identical_embeddings(class_names, embeddings)
    embeddings = embeddings.to(device)
    log.info("predicting %d image(s) into %d classes: %s", len(paths), len(class_names), ", ".join(class_names))

    colours = class_colours(len(class_names))
    alpha = float(cfg.get("alpha", 0.5))
    save_maps = bool(cfg.get("save_maps", False))
    atomic_write_text(
        output_dir / "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(class_names)), what="class list"
    )
    results = []
    with _progress(len(paths), bool(cfg.get("progress", True))) as progress, torch.no_grad():
        task = progress.add_task("predict", total=len(paths))
        for path, name in zip(paths, _output_names(paths)):
            picture = load_image(path)
            height, width = picture.shape[:2]
            image = torch.from_numpy(picture).permute(2, 0, 1).float().div(255)[None].to(device)
            if short_side is not None:
                scale = short_side / min(height, width)
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                image = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            with trainer.precision_plugin.predict_step_context():
                logits = open_vocabulary_logits(model, image, embeddings)
            class_map = resize_logits(logits.float(), (height, width)).argmax(dim=1)[0].cpu().numpy()
            overlay_path = output_dir / "overlays" / f"{name}.png"
            write_png(overlay_path, _overlay_with_legend(picture, class_map, class_names, colours, alpha))
            map_path = None
            if save_maps:
                map_path = output_dir / "maps" / f"{name}.png"
                _write_map(map_path, class_map, len(class_names))
            counts = np.bincount(class_map.ravel(), minlength=len(class_names))
            results.append(
                {
                    "input": str(path),
                    "overlay": str(overlay_path),
                    "map": str(map_path) if map_path is not None else None,
                    "classes": {class_names[c]: float(counts[c] / class_map.size) for c in np.flatnonzero(counts).tolist()},
                }
            )
            progress.advance(task)
    summary = {"output_dir": str(output_dir), "ckpt_path": ckpt_path, "class_names": class_names, "images": results}
    atomic_write_text(output_dir / "predictions.json", json.dumps(summary, indent=2) + "\n", what="predictions")
    log.info("wrote %d overlay(s)%s to %s", len(results), " and class maps" if save_maps else "", output_dir)
    return summary, objects


@hydra.main(version_base="1.3", config_path="pkg://zeroseg.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    predict(cfg)


if __name__ == "__main__":
    main()
