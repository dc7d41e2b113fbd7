"""The one data layer every zeroseg method trains and evaluates on.

``ZSSDataModule`` takes a :class:`~zeroseg.data.splits.ClassSplit` (which classes exist and which
are unseen), a setting (inductive or transductive) and one dataset per stage. Datasets return
``{"image": float (3, H, W) in [0, 1], "label": int64 (H, W)}`` with labels in the full class-id
space; images are not normalised here because the student backbone and the CLIP teacher each
normalise with their own statistics.

Training labels are remapped to training ids (:meth:`ClassSplit.train_label_lut`): unseen pixels
become ``ignore_index`` in both settings, and in the inductive setting the remaining ids index the
seen classes only, matching :attr:`ZSSDataModule.train_class_names` — exactly the names the model
is given in training. Validation and test keep full labels and all classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from zeroseg.data.protocol import label_histograms, select_training_images
from zeroseg.data.samplers import ResumableDataLoader, ResumableTrainSampler, ShardedEvalSampler
from zeroseg.data.splits import ClassSplit, Setting, check_setting
from zeroseg.data.verify import verify_datasets

log = logging.getLogger(__name__)

__all__ = ["ZSSDataModule", "TrainingLabels", "collate_segmentation", "image_keys"]

DatasetFactory = Callable[[], Dataset]

# which dataset splits each Lightning stage needs
STAGE_SPLITS: dict[Optional[str], tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


class TrainingLabels(Dataset):
    """A view of a dataset whose labels are mapped through a ``full id → training id`` table."""

    def __init__(self, dataset: Dataset, label_lut: torch.Tensor, ignore_index: int) -> None:
        self.dataset = dataset
        self.label_lut = label_lut
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        label = item["label"]
        out_of_range = label >= len(self.label_lut)
        if bool(out_of_range.any()):
            raise ValueError(
                f"training label of item {index} contains values {torch.unique(label[out_of_range]).tolist()}; "
                f"expected class ids below {len(self.label_lut)} or ignore_index={self.ignore_index}"
            )
        item["label"] = self.label_lut[label]
        return item


def image_keys(dataset: Dataset) -> Optional[list[Hashable]]:
    """One key per item naming the image it shows, comparable across datasets; ``None`` when the
    dataset does not say.

    Folder readers: the resolved image path (two splits listing the same file are the same image);
    synthetic scenes: the scene generator's settings and the scene's seed (a scene is a function of both).
    """
    if isinstance(dataset, Subset):
        keys = image_keys(dataset.dataset)
        return None if keys is None else [keys[i] for i in dataset.indices]
    if isinstance(dataset, TrainingLabels):
        return image_keys(dataset.dataset)
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        return [str(Path(image).resolve()) for image, _ in pairs]
    seeds = getattr(dataset, "seed_range", None)
    if isinstance(seeds, range):
        settings = repr(getattr(dataset, "scene_config", None))
        return [("synthetic scene", settings, seed) for seed in seeds]
    return None


def collate_segmentation(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of equal size; items of different sizes (real test images, resized keeping
    their aspect ratio) stay lists of tensors, which the methods evaluate one at a time."""
    shapes = {(tuple(item["image"].shape), tuple(item["label"].shape)) for item in items}
    if len(shapes) == 1:
        return default_collate(list(items))
    return {key: [item[key] for item in items] for key in items[0]}


class ZSSDataModule(L.LightningDataModule):
    """Zero-shot segmentation data: class split, setting, and train/val/test loaders.

    Args:
        split: the dataset's classes and unseen subset.
        train_dataset / val_dataset / test_dataset: zero-argument factories (Hydra ``_partial_``)
            building each stage's dataset; ``test_dataset`` defaults to the validation one.
        setting: ``inductive`` (default) or ``transductive``.
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        num_workers: loader workers per process.
        seed: seeds the training order (a permutation per epoch).
        drop_images_with_unseen: drop training images containing any unseen pixel (ZS3Net's
            protocol); default keeps them with unseen pixels ignored (ZegCLIP's).
        skip_all_ignore: drop training images whose training label is all ignore (zsseg/DeOP).
        label_statistics: count training pixels per class at setup and report them even when no
            image is dropped (always done when an option above is on).
        cache_dir: where per-image label counts of folder datasets and verification results are cached.
        verify: before training or testing, check every file of the splits the stage uses
            (:mod:`zeroseg.data.verify`: exist, open, sizes match, valid label values) and list
            every problem; splits that passed before and did not change are skipped.
    """

    def __init__(
        self,
        split: ClassSplit,
        train_dataset: Optional[DatasetFactory] = None,
        val_dataset: Optional[DatasetFactory] = None,
        test_dataset: Optional[DatasetFactory] = None,
        setting: Setting = "inductive",
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        drop_images_with_unseen: bool = False,
        skip_all_ignore: bool = False,
        label_statistics: bool = False,
        cache_dir: Optional[str] = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.split = split
        self.setting = check_setting(setting)
        self.dataset_factories = {"train": train_dataset, "val": val_dataset, "test": test_dataset or val_dataset}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.drop_images_with_unseen = drop_images_with_unseen
        self.skip_all_ignore = skip_all_ignore
        self.label_statistics = label_statistics
        self.cache_dir = cache_dir
        self.verify = verify
        self._built: dict[str, Dataset] = {}
        self.training_set_report: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}
        self._train_loader: Optional[ResumableDataLoader] = None

    # -- what the model is told -------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        """All class names, ordered by full id (what evaluation classifies over)."""
        return self.split.class_names

    @property
    def unseen_class_ids(self) -> list[int]:
        return self.split.unseen_class_ids

    @property
    def train_class_names(self) -> tuple[str, ...]:
        """Exactly the class names given to the model in training."""
        return self.split.train_class_names(self.setting)

    @property
    def ignore_index(self) -> int:
        return self.split.ignore_index

    # -- datasets -----------------------------------------------------------------------------
    def _build(self, stage: str) -> Dataset:
        if stage in self._built:
            return self._built[stage]
        factory = self.dataset_factories[stage]
        if factory is None:
            raise ValueError(f"dataset '{self.split.name}': no {stage} dataset is configured (dataset.{stage}_dataset)")
        dataset = factory()
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"dataset '{self.split.name}': the {stage} split is empty; expected at least one image")
        self._built[stage] = dataset
        return dataset

    def prepare_data(self) -> None:
        """Verify the files of the splits this stage uses (once per node, before ``setup``)."""
        if not self.verify:
            return
        trainer = self.trainer
        stage = str(trainer.state.fn.value) if trainer is not None and trainer.state.fn is not None else None
        # each configured factory once: the test split of the real benchmarks is their val split
        factories = {}
        for name in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            factory = self.dataset_factories[name]
            if factory is not None and all(factory is not other for other in factories.values()):
                factories[name] = factory
        datasets = {name: self._build(name) for name in factories}
        verify_datasets(datasets, self.split.name, self.cache_dir, self.num_workers)

    def setup(self, stage: Optional[str] = None) -> None:
        for name in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if name in self.datasets:
                continue
            dataset = self._build(name)
            if name == "train":
                dataset = TrainingLabels(
                    self._select_training_images(dataset), self.split.train_label_lut(self.setting), self.ignore_index
                )
            self.datasets[name] = dataset
            log.info("dataset '%s' %s split: %d images", self.split.name, name, len(dataset))  # type: ignore[arg-type]

    def _select_training_images(self, dataset: Dataset) -> Dataset:
        """Apply the protocol options and report what they kept and removed."""
        if not (self.drop_images_with_unseen or self.skip_all_ignore or self.label_statistics):
            self.training_set_report = {"images": len(dataset), "kept_images": len(dataset)}  # type: ignore[arg-type]
            return dataset
        histograms = label_histograms(dataset, self.split.num_classes, self.cache_dir, self.num_workers)
        keep, report = select_training_images(
            histograms, self.split, self.setting, self.drop_images_with_unseen, self.skip_all_ignore
        )
        self.training_set_report = report
        pixels = max(report["labelled_pixels"], 1)
        log.info(
            "dataset '%s' training set (%s): %d images, %d labelled pixels; unseen pixels -> ignore: %d (%.2f%%) in %d images",
            self.split.name, self.setting, report["images"], report["labelled_pixels"],
            report["unseen_pixels_to_ignore"], 100 * report["unseen_pixels_to_ignore"] / pixels, report["images_with_unseen"],
        )  # fmt: skip
        for option in ("drop_images_with_unseen", "skip_all_ignore"):
            if option in report:
                r = report[option]
                log.info(
                    "  %s: removed %d images (%d trainable pixels), kept %d",
                    option, r["removed_images"], r["removed_trainable_pixels"], r["kept_images"],
                )  # fmt: skip
        log.info("  kept %d images, %d trainable pixels", report["kept_images"], report["kept_trainable_pixels"])
        if report["kept_images"] == 0:
            raise ValueError(f"dataset '{self.split.name}': the protocol options removed every training image ({report})")
        return dataset if len(keep) == len(histograms) else Subset(dataset, keep.tolist())

    # -- evaluation protocol --------------------------------------------------------------------
    def test_shares_validation_images(self) -> tuple[bool, str]:
        """Whether the test split holds images the validation split also holds, and the evidence.

        On the real benchmarks ``dataset.test_dataset`` is null (mmseg's configs test on the
        validation split), so selecting a checkpoint by its validation score selects it on the test
        images. Separately configured splits are compared image by image (:func:`image_keys`); splits
        whose images cannot be compared count as shared, because only disjointness makes a
        validation-selected checkpoint an honest test.
        """
        val_factory, test_factory = self.dataset_factories["val"], self.dataset_factories["test"]
        if val_factory is None:
            return False, "no validation split is configured (dataset.val_dataset is null)"
        if test_factory is val_factory:
            return True, "dataset.test_dataset is null, so the test split is the validation split"
        val_keys, test_keys = image_keys(self._build("val")), image_keys(self._build("test"))
        if val_keys is None or test_keys is None:
            return True, "the test and validation images cannot be compared, so they are not known to be disjoint"
        shared = len(set(test_keys) & set(val_keys))
        if shared:
            return True, f"{shared} of the {len(test_keys)} test images are also validation images"
        return False, f"the {len(test_keys)} test images and the {len(val_keys)} validation images are disjoint"

    # -- loaders ------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader_generator(self) -> torch.Generator:
        # loaders draw their worker seeds from their own generator, never from the global RNG,
        # so creating a loader does not shift the model's random stream (exact resume)
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = self.datasets["train"]
        if self._train_loader is None or self._train_loader.dataset is not dataset:
            sampler = ResumableTrainSampler(len(dataset), seed=self.seed, rank=rank, world_size=world)  # type: ignore[arg-type]
            if len(sampler) < self.batch_size:
                raise ValueError(
                    f"dataset '{self.split.name}': the train split gives {len(sampler)} images per process, "
                    f"fewer than dataset.batch_size={self.batch_size}"
                )
            self._train_loader = ResumableDataLoader(
                dataset,
                sampler=sampler,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                drop_last=True,  # a batch of one breaks BatchNorm in training
                persistent_workers=self.num_workers > 0,
                generator=self._loader_generator(),
            )
        return self._train_loader

    def _eval_loader(self, name: str) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = self.datasets[name]
        return DataLoader(
            dataset,
            sampler=ShardedEvalSampler(len(dataset), rank=rank, world_size=world),  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=self._loader_generator(),
            collate_fn=collate_segmentation,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def describe(self) -> dict[str, Any]:
        return {
            **self.split.to_dict(),
            "setting": self.setting,
            "train_class_names": list(self.train_class_names),
            "drop_images_with_unseen": self.drop_images_with_unseen,
            "skip_all_ignore": self.skip_all_ignore,
        }
