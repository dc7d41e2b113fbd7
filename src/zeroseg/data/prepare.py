"""``python -m zeroseg.data.prepare <dataset> --raw <dir> --out <dir>``: build the layouts the readers
expect (:mod:`zeroseg.data.folders`) from the official downloads, extracted under ``--raw``.

==============  ===========================================================================  ======================
dataset         ``--raw`` must hold (extracted archives)                                         writes under ``--out``
==============  ===========================================================================  ======================
``voc``         ``VOCdevkit/VOC2012/`` (VOCtrainval_11-May-2012.tar),                           ``VOCdevkit/VOC2012``
                ``benchmark_RELEASE/dataset/{cls/*.mat,train.txt,val.txt}`` (SBD)
``coco_stuff``  ``train2017/``, ``val2017/`` (COCO images),                                     ``coco_stuff164k``
                ``stuffthingmaps_trainval2017/{train2017,val2017}/*.png``
``context``     ``VOCdevkit/VOC2010/`` (VOCtrainval_03-May-2010.tar),                           ``VOCdevkit/VOC2010``
                ``trainval/*.mat`` + ``labels.txt`` (PASCAL-Context trainval.tar.gz),
                optional ``trainval_merged.json`` (PASCAL in Detail: mmseg's exact split)
``ade``         ``ADEChallengeData2016/`` (ADEChallengeData2016.zip)                            ``ADEChallengeData2016``
==============  ===========================================================================  ======================

Conversions: SBD ``GTcls.Segmentation`` ``.mat`` → PNG (``SegmentationClassAug``; ``aug.txt`` = SBD
train+val minus VOC train and val, so train.txt + aug.txt = 10,582 images); COCO-Stuff raw values
(COCO id − 1, 0–181, 11 ids never used) → 171 training ids from the official label list
(:data:`~zeroseg.data.benchmarks.COCO_STUFF_RAW_NAMES`); Context 459-class ``LabelMap`` → 0
background + the 59 classes matched by name in ``labels.txt`` (no Detail API needed). Context's
lists are mmseg's (4,996 / 5,104: the ``train`` / ``val`` phases of the PASCAL in Detail file
``trainval_merged.json``, read as JSON) when that file is in ``--raw``; otherwise VOC2010's
``ImageSets/Main`` train/val lists restricted to annotated images, which hold 4,998 / 5,105 images
(3 more than mmseg's; the run says so, and prints the differing ids when it has the Detail file).
Images are hard-linked when possible (``--link``), else copied.

Every output label is read back and its values checked against the layout's valid set; the image
counts of every split are compared with the official ones (``--allow-partial`` accepts fewer, for
subsets). Finished files are skipped, so an interrupted run resumes; files are written to a
temporary name and renamed, so a crash never leaves a half-written file. Raw data is only read:
an output path that falls inside a raw folder is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from zeroseg.data.benchmarks import COCO_STUFF_RAW_NAMES, COCO_STUFF_UNUSED_RAW_NAMES, CONTEXT60_CLASSES
from zeroseg.data.folders import read_label

__all__ = ["PrepareError", "main", "prepare"]

OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "voc": {"train": 10582, "val": 1449},
    "coco_stuff": {"train": 118287, "val": 5000},
    # mmseg's lists: the PASCAL in Detail annotation file's train / val phases
    "context": {"train": 4996, "val": 5104},
    "ade": {"train": 20210, "val": 2000},
}
# PASCAL-Context without the Detail file: VOC2010's ImageSets/Main lists restricted to the images with a
# .mat label hold 2 train and 1 val image more than mmseg's lists (counted on the official downloads)
CONTEXT_MAIN_COUNTS: dict[str, int] = {"train": 4998, "val": 5105}
# the Detail API's annotation file (trainval_merged.json), where mmseg's converter expects it or at the top of --raw
CONTEXT_DETAIL_FILES = ("trainval_merged.json", "VOCdevkit/VOC2010/trainval_merged.json")
VALID_LABEL_VALUES: dict[str, set[int]] = {
    "voc": set(range(21)) | {255},
    "coco_stuff": set(range(171)) | {255},
    "context": set(range(60)),
    "ade": set(range(151)),
}


class PrepareError(RuntimeError):
    """A raw file or folder is missing or corrupt, or the result fails verification."""


# -- one unit of work: produce one output file --------------------------------------------------------
@dataclass(frozen=True)
class FileJob:
    """Make ``dst`` from ``src`` with ``kind`` (link | label_png | sbd_mat | coco_label | context_mat)."""

    kind: str
    src: Path
    dst: Path
    split: str = ""
    lut: Optional[np.ndarray] = field(default=None, compare=False)


def _write_png(array: np.ndarray, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    Image.fromarray(array.astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, dst)


def _link(src: Path, dst: Path, mode: str) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    if mode == "symlink":
        os.symlink(src.resolve(), tmp)
    elif mode in ("hardlink", "auto"):
        try:
            os.link(src, tmp)
        except OSError:
            if mode == "hardlink":
                raise
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _load_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as error:
        raise PrepareError(f"cannot read MATLAB file {path}: {error}") from error
    try:
        if key == "GTcls":
            return np.asarray(content["GTcls"].Segmentation)
        return np.asarray(content[key])
    except (KeyError, AttributeError) as error:
        raise PrepareError(f"MATLAB file {path} has no {key!r} label array (expected the official format): {error}") from error


def _apply_lut(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 2:
        raise PrepareError(f"label in {path} has shape {raw.shape}; expected a 2-d label map")
    if raw.min() < 0 or raw.max() >= len(lut) or (lut[raw] < 0).any():
        values = np.unique(raw)
        bad = [int(v) for v in values if v < 0 or v >= len(lut) or lut[v] < 0]
        raise PrepareError(f"label in {path} holds raw values {bad} that the conversion does not define")
    return lut[raw]


def run_job(job: FileJob, link_mode: str = "auto") -> tuple[str, set[int]]:
    """Produce ``job.dst`` unless it exists; return (split, label values of the output, if a label)."""
    try:
        if not job.dst.exists():
            job.dst.parent.mkdir(parents=True, exist_ok=True)
            if job.kind == "link":
                _link(job.src, job.dst, link_mode)
                return job.split, set()
            if job.kind == "label_png":
                _link(job.src, job.dst, "copy")
            elif job.kind == "sbd_mat":
                _write_png(_load_mat(job.src, "GTcls"), job.dst)
            elif job.kind in ("coco_label", "context_mat"):
                raw = read_label(job.src) if job.kind == "coco_label" else _load_mat(job.src, "LabelMap")
                assert job.lut is not None
                _write_png(_apply_lut(raw.astype(np.int64), job.lut, job.src), job.dst)
            else:
                raise PrepareError(f"unknown job kind {job.kind!r}")
        elif job.kind == "link":
            return job.split, set()
        return job.split, {int(v) for v in np.unique(read_label(job.dst))}
    except PrepareError:
        raise
    except Exception as error:
        raise PrepareError(f"while making {job.dst} from {job.src}: {type(error).__name__}: {error}") from error


def _run_job_star(args: tuple[FileJob, str]) -> tuple[str, set[int]]:
    return run_job(*args)


def run_jobs(jobs: Sequence[FileJob], name: str, workers: int, link_mode: str, stream=sys.stderr) -> dict[str, set[int]]:
    """Run jobs (in ``workers`` processes), printing progress; label values seen per split."""
    values: dict[str, set[int]] = {}
    start, last = time.monotonic(), 0.0
    work = [(job, link_mode) for job in jobs]
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results: Iterable[tuple[str, set[int]]] = (
            executor.map(_run_job_star, work, chunksize=32) if executor else map(_run_job_star, work)
        )
        for done, (split, found) in enumerate(results, start=1):
            values.setdefault(split, set()).update(found)
            now = time.monotonic()
            if now - last > 2.0 or done == len(work):
                last = now
                rate = done / max(now - start, 1e-9)
                print(f"[prepare {name}] {done}/{len(work)} files ({rate:.0f}/s)", file=stream, flush=True)
    finally:
        if executor:
            executor.shutdown(cancel_futures=True)
    return values


# -- per-dataset plans -------------------------------------------------------------------------------
def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise PrepareError(f"{what}: {path} does not exist")
    return path


def _ids(list_file: Path) -> list[str]:
    _require(list_file, "list file")
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _write_list(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{i}\n" for i in ids))
    os.replace(tmp, path)


@dataclass
class Plan:
    jobs: list[FileJob]
    counts: dict[str, int]  # images per split in the output
    raw_roots: list[Path]
    out_root: Path
    lists: dict[Path, list[str]] = field(default_factory=dict)
    valid_values: set[int] = field(default_factory=set)
    # images per split of the reference release, and what that reference is (``None``: OFFICIAL_COUNTS)
    official: Optional[dict[str, int]] = None
    official_source: str = "the official count"
    notes: list[str] = field(default_factory=list)


def plan_voc(raw: Path, out: Path) -> Plan:
    voc = _require(raw / "VOCdevkit/VOC2012", "VOC 2012 (extract VOCtrainval_11-May-2012.tar into --raw)")
    sbd = _require(raw / "benchmark_RELEASE/dataset", "SBD (extract benchmark.tgz into --raw)")
    train, val = _ids(voc / "ImageSets/Segmentation/train.txt"), _ids(voc / "ImageSets/Segmentation/val.txt")
    sbd_ids = sorted(set(_ids(sbd / "train.txt")) | set(_ids(sbd / "val.txt")))
    aug = sorted(set(sbd_ids) - set(train) - set(val))
    root = out / "VOCdevkit/VOC2012"
    jobs = [
        FileJob("link", voc / "JPEGImages" / f"{i}.jpg", root / "JPEGImages" / f"{i}.jpg", "images")
        for i in sorted(set(train) | set(val) | set(aug))
    ]
    jobs += [
        FileJob("label_png", voc / "SegmentationClass" / f"{i}.png", root / "SegmentationClass" / f"{i}.png", split)
        for split, ids in (("train", train), ("val", val))
        for i in ids
    ]
    jobs += [FileJob("sbd_mat", sbd / "cls" / f"{i}.mat", root / "SegmentationClassAug" / f"{i}.png", "train") for i in aug]
    lists = {root / "ImageSets/Segmentation" / f"{n}.txt": ids for n, ids in (("train", train), ("val", val), ("aug", aug))}
    return Plan(jobs, {"train": len(train) + len(aug), "val": len(val)}, [voc, sbd], root, lists, VALID_LABEL_VALUES["voc"])


def coco_stuff_raw_lut() -> np.ndarray:
    """Raw stuffthingmaps value (COCO id − 1) → training id 0..170; 255 stays; unused ids → -1."""
    lut = np.full(256, -1, dtype=np.int64)
    train_id = 0
    for raw_value, name in enumerate(COCO_STUFF_RAW_NAMES):
        if name not in COCO_STUFF_UNUSED_RAW_NAMES:
            lut[raw_value] = train_id
            train_id += 1
    lut[255] = 255
    return lut


def plan_coco_stuff(raw: Path, out: Path) -> Plan:
    maps = _require(raw / "stuffthingmaps_trainval2017", "COCO-Stuff labels (extract stuffthingmaps_trainval2017.zip into --raw)")
    root = out / "coco_stuff164k"
    lut = coco_stuff_raw_lut()
    jobs, counts = [], {}
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        images = sorted(_require(raw / folder, f"COCO {folder} images (extract {folder}.zip into --raw)").glob("*.jpg"))
        counts[split] = len(images)
        for image in images:
            label = _require(maps / folder / f"{image.stem}.png", f"COCO-Stuff label of {image}")
            jobs.append(FileJob("link", image, root / "images" / folder / image.name, "images"))
            jobs.append(
                FileJob("coco_label", label, root / "annotations" / folder / f"{image.stem}_labelTrainIds.png", split, lut)
            )
    return Plan(jobs, counts, [raw / "train2017", raw / "val2017", maps], root, {}, VALID_LABEL_VALUES["coco_stuff"])


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def context_lut(labels_txt: Path) -> np.ndarray:
    """459-class id → 0 (background: every class outside the 59) or 1..59, matched by name."""
    entries: dict[str, int] = {}
    for line in _require(labels_txt, "PASCAL-Context labels.txt").read_text().splitlines():
        if ":" not in line:
            continue
        number, name = line.split(":", 1)
        entries[_normalise(name)] = int(number)
    if not entries:
        raise PrepareError(f"{labels_txt} lists no '<id>: <name>' lines; expected the 459-class list of trainval.tar.gz")
    lut = np.zeros(max(entries.values()) + 1, dtype=np.int64)
    missing = []
    for index, name in enumerate(CONTEXT60_CLASSES[1:], start=1):
        if _normalise(name) in entries:
            lut[entries[_normalise(name)]] = index
        else:
            missing.append(name)
    if missing:
        raise PrepareError(f"{labels_txt}: the 59-class names {missing} are not in the 459-class list")
    return lut


def detail_split(path: Path) -> dict[str, list[str]]:
    """The train and val image ids of a PASCAL in Detail annotation file (``trainval_merged.json``),
    sorted: what mmseg's converter writes as ``ImageSets/SegmentationContext/{train,val}.txt``."""
    import json

    try:
        images = json.loads(path.read_text())["images"]
        phases = {"train": [], "val": []}
        for image in images:
            if image["phase"] in phases:
                phases[image["phase"]].append(Path(image["file_name"]).stem)
    except (ValueError, KeyError, TypeError) as error:
        raise PrepareError(
            f"{path} is not a PASCAL in Detail annotation file (expected 'images' entries with 'file_name' and 'phase'): "
            f"{type(error).__name__}: {error}"
        ) from error
    return {split: sorted(ids) for split, ids in phases.items()}


def plan_context(raw: Path, out: Path) -> Plan:
    voc = _require(raw / "VOCdevkit/VOC2010", "VOC 2010 (extract VOCtrainval_03-May-2010.tar into --raw)")
    mats = _require(raw / "trainval", "PASCAL-Context labels (extract trainval.tar.gz into --raw)")
    lut = context_lut(raw / "labels.txt")
    annotated = {p.stem for p in mats.glob("*.mat")}
    main = {split: [i for i in _ids(voc / "ImageSets/Main" / f"{split}.txt") if i in annotated] for split in ("train", "val")}
    detail_file = next((raw / name for name in CONTEXT_DETAIL_FILES if (raw / name).is_file()), None)
    notes: list[str] = []
    if detail_file is not None:
        # mmseg's exact split; the labels still come from the .mat files, which every listed image needs
        split_ids = detail_split(detail_file)
        for split, ids in split_ids.items():
            missing = [i for i in ids if i not in annotated]
            if missing:
                raise PrepareError(
                    f"{detail_file} lists {len(missing)} {split} images without a label in {mats}, e.g. {missing[:3]}"
                )
            extra = sorted(set(main[split]) - set(ids))
            if extra:
                notes.append(
                    f"{split}: VOC2010's Main list has {len(extra)} annotated images that mmseg's split leaves out: {extra}"
                )
        official, source = OFFICIAL_COUNTS["context"], f"mmseg's count (Detail lists of {detail_file.name})"
    else:
        split_ids = main
        official, source = CONTEXT_MAIN_COUNTS, "the count of VOC2010's Main lists with a label"
        notes.append(
            "lists from VOC2010 ImageSets/Main restricted to annotated images (4,998 / 5,105 on the official downloads): "
            "2 train and 1 val image more than mmseg's 4,996 / 5,104. For mmseg's exact split put the Detail API's "
            "trainval_merged.json into --raw (the ids that differ are then printed)"
        )
    root = out / "VOCdevkit/VOC2010"
    jobs, counts, lists = [], {}, {}
    for split in ("train", "val"):
        ids = split_ids[split]
        counts[split] = len(ids)
        lists[root / "ImageSets/SegmentationContext" / f"{split}.txt"] = ids
        for i in ids:
            jobs.append(FileJob("link", voc / "JPEGImages" / f"{i}.jpg", root / "JPEGImages" / f"{i}.jpg", "images"))
            jobs.append(FileJob("context_mat", mats / f"{i}.mat", root / "SegmentationClassContext" / f"{i}.png", split, lut))
    return Plan(jobs, counts, [voc, mats], root, lists, VALID_LABEL_VALUES["context"], official, source, notes)


def plan_ade(raw: Path, out: Path) -> Plan:
    ade = _require(raw / "ADEChallengeData2016", "ADE20K (extract ADEChallengeData2016.zip into --raw)")
    root = out / "ADEChallengeData2016"
    jobs, counts = [], {}
    for split, folder in (("train", "training"), ("val", "validation")):
        images = sorted(_require(ade / "images" / folder, "ADE20K images").glob("*.jpg"))
        counts[split] = len(images)
        for image in images:
            label = _require(ade / "annotations" / folder / f"{image.stem}.png", f"ADE20K label of {image}")
            jobs.append(FileJob("link", image, root / "images" / folder / image.name, "images"))
            jobs.append(FileJob("label_png", label, root / "annotations" / folder / label.name, split))
    return Plan(jobs, counts, [ade], root, {}, VALID_LABEL_VALUES["ade"])


PLANS: dict[str, Callable[[Path, Path], Plan]] = {
    "voc": plan_voc,
    "coco_stuff": plan_coco_stuff,
    "context": plan_context,
    "ade": plan_ade,
}


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def prepare(
    dataset: str, raw: Path, out: Path, workers: int = 1, link: str = "auto", allow_partial: bool = False
) -> dict[str, int]:
    """Build ``dataset``'s layout under ``out`` from ``raw``; returns the image count per split."""
    if dataset not in PLANS:
        raise PrepareError(f"dataset {dataset!r} is unknown; expected one of {sorted(PLANS)}")
    raw, out = Path(raw), Path(out)
    plan = PLANS[dataset](raw, out)
    for source in plan.raw_roots:
        if _inside(plan.out_root, source) or _inside(source, plan.out_root):
            raise PrepareError(
                f"output {plan.out_root} overlaps the raw folder {source}; raw data is never overwritten: choose another --out"
            )
    official = plan.official or OFFICIAL_COUNTS[dataset]
    for note in plan.notes:
        print(f"[prepare {dataset}] note: {note}", file=sys.stderr)
    for split, count in plan.counts.items():
        if count == 0:
            raise PrepareError(f"{dataset}: the {split} split of {raw} has no images")
        if count != official[split] and not (allow_partial and count < official[split]):
            raise PrepareError(
                f"{dataset}: the raw {split} split has {count} images, {plan.official_source} is {official[split]} "
                "(pass --allow-partial to prepare a subset)"
            )
    values = run_jobs(plan.jobs, dataset, workers, link)
    for split in plan.counts:
        bad = sorted(values.get(split, set()) - plan.valid_values)
        if bad:
            raise PrepareError(f"{dataset}: {split} labels hold values {bad} outside the valid set")
    for path, ids in plan.lists.items():
        _write_list(path, ids)
    for split, count in plan.counts.items():
        print(f"[prepare {dataset}] {split}: {count} images, label values {sorted(values.get(split, set()))}", file=sys.stderr)
    print(f"[prepare {dataset}] done: {plan.out_root}", file=sys.stderr)
    return dict(plan.counts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zeroseg.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(PLANS))
    parser.add_argument("--raw", required=True, type=Path, help="folder holding the extracted official downloads")
    parser.add_argument("--out", required=True, type=Path, help="paths.data_dir: the layout is written under it")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument(
        "--link",
        choices=["auto", "hardlink", "symlink", "copy"],
        default="auto",
        help="how images are placed (auto: hardlink, else copy)",
    )
    parser.add_argument("--allow-partial", action="store_true", help="accept fewer images than the official counts (subsets)")
    args = parser.parse_args(argv)
    try:
        prepare(args.dataset, args.raw, args.out, args.workers, args.link, args.allow_partial)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
