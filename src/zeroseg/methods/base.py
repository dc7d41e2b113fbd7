"""What every zeroseg method shares: class bookkeeping, text embeddings, evaluation, optimisation,
checkpoint hygiene.

A method subclasses :class:`ZSSMethod` and provides two things:

* :meth:`ZSSMethod.training_losses` — the paper's training objective on one batch, returning a
  dict of named loss terms whose ``"loss"`` entry is optimised (every entry is logged under
  ``train/``);
* :meth:`ZSSMethod.predict_logits` — dense logits ``(B, C, h, w)`` of images against a given set
  of class text embeddings (any resolution; the base resizes to the label size).

The base owns the rest. Training sees only :attr:`train_class_names` (the seen classes in the
inductive setting) and their text embeddings :attr:`train_text_embeddings`; validation and test
classify over all classes (:attr:`class_text_embeddings`) into :class:`~zeroseg.metrics.HarmonicIoU`.
The frozen CLIP teacher is a submodule (so it follows the device) but is never written into
checkpoints: :meth:`on_save_checkpoint` drops it and records where it came from, and
:meth:`on_load_checkpoint` re-inserts the current teacher's weights after checking that the
checkpoint's classes are the configured ones. Checkpoints also carry the RNG states, so a
resumed run continues the same random stream.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.data.splits import ClassSplit, Setting, check_setting
from zeroseg.inference import SegmentationInference, resize_logits
from zeroseg.metrics import SUMMARY_KEYS, HarmonicIoU

log = logging.getLogger(__name__)

__all__ = [
    "ZSSMethod",
    "CheckpointMismatchError",
    "WEIGHT_DECAY_EXEMPTIONS",
    "check_weight_decay_exempt",
    "warn_identical_embeddings",
    "weight_decay_exempt_parameters",
]

TEACHER_PREFIX = "teacher."

# normalisation layers by type (Mask2Former's build_optimizer list; _NormBase covers BatchNorm1d/2d/3d,
# SyncBatchNorm and InstanceNorm1d/2d/3d, and subclasses such as timm's BatchNormAct2d / LayerNorm2d)
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _owned_by_norm(module: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    return isinstance(module, NORM_LAYER_TYPES)


def _is_bias(module: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    return name.endswith("bias")  # ``bias`` and nn.MultiheadAttention's ``in_proj_bias``


def _owned_by_embedding(module: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    return isinstance(module, nn.Embedding)


# weight-decay exemption rules: a parameter is exempt when any configured rule names it
WEIGHT_DECAY_EXEMPTIONS: dict[str, Callable[[nn.Module, str, nn.Parameter], bool]] = {
    # every parameter of a normalisation layer (NORM_LAYER_TYPES): Mask2Former's WEIGHT_DECAY_NORM=0, mmseg's norm_decay_mult=0
    "norm": _owned_by_norm,
    # every parameter whose own name ends in "bias" (``bias``, ``in_proj_bias``): SegFormer/mmseg's bias rule
    "bias": _is_bias,
    # the weight of every nn.Embedding (query features and positions, the decoder's level embedding):
    # Mask2Former's WEIGHT_DECAY_EMBED=0; raw nn.Parameter tensors are not embeddings, as in the reference
    "embedding": _owned_by_embedding,
}


def check_weight_decay_exempt(rules: Sequence[str]) -> tuple[str, ...]:
    """The rule names as a tuple, or a ``ValueError`` naming ``method.weight_decay_exempt`` and the allowed values."""
    allowed = sorted(WEIGHT_DECAY_EXEMPTIONS)
    if isinstance(rules, str):
        raise ValueError(f"method.weight_decay_exempt must be a list of rule names from {allowed}, got the string {rules!r}")
    unknown = [rule for rule in rules if rule not in WEIGHT_DECAY_EXEMPTIONS]
    if unknown:
        raise ValueError(f"method.weight_decay_exempt has unknown rule(s) {unknown}: allowed values are {allowed}")
    return tuple(rules)


def weight_decay_exempt_parameters(model: nn.Module, rules: Sequence[str]) -> set[int]:
    """``id``s of the parameters of ``model`` that the exemption ``rules`` name (each parameter judged
    by the module that owns it and its own attribute name; a shared parameter by its first owner)."""
    predicates = [WEIGHT_DECAY_EXEMPTIONS[rule] for rule in check_weight_decay_exempt(rules)]
    exempt: set[int] = set()
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if any(predicate(module, name, parameter) for predicate in predicates):
                exempt.add(id(parameter))
    return exempt


def warn_identical_embeddings(class_names: Sequence[str], embeddings: Tensor) -> list[tuple[str, str]]:
    """Warn about classes whose text embeddings are identical (the tokenizer truncated their prompts to
    the same text, or their names differ only in ways it drops); returns the pairs."""
    normalised = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = normalised @ normalised.t()
    first, second = torch.nonzero(torch.triu(similarity > 1 - 1e-6, diagonal=1), as_tuple=True)
    pairs = [(class_names[i], class_names[j]) for i, j in zip(first.tolist(), second.tolist())]
    if pairs:
        log.warning(
            "%d pair(s) of classes get identical text embeddings, so the model cannot tell them apart: %s. "
            "The teacher's tokenizer truncates prompts to its context length (or the names differ only in case or "
            "punctuation); rename one of each pair (dataset.split.rename={old: new}) or use shorter templates",
            len(pairs), ", ".join(f"{a!r} = {b!r}" for a, b in pairs),
        )  # fmt: skip
    return pairs


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for other classes or another split than the configured one."""


def _capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_internal, python_version = state["python"]
    random.setstate((python_version, tuple(python_internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ZSSMethod(L.LightningModule):
    """Base LightningModule of all zero-shot segmentation methods.

    Args:
        split: the dataset's classes and unseen subset (from the datamodule).
        setting: ``inductive`` or ``transductive`` (from the datamodule).
        teacher: the frozen CLIP teacher.
        optimizer: a partially-applied optimizer (Hydra ``_partial_``), completed with the
            parameter groups of :meth:`parameter_groups`.
        scheduler: a partially-applied LR scheduler completed with the optimizer, stepped every
            optimizer step; ``None`` for a constant LR.
        lr_multipliers: ``{module-name prefix: factor}``; a parameter takes the factor of the
            longest matching prefix (e.g. ``{head: 10.0}``, the SegFormer recipe).
        weight_decay_exempt: rules naming the parameters trained without weight decay, any of
            ``norm`` (parameters of normalisation layers), ``bias`` (parameters named ``*bias``),
            ``embedding`` (``nn.Embedding`` weights); ``[norm, bias]`` is the SegFormer/mmseg rule
            (the zeroseg methods' default), ``[norm, embedding]`` Mask2Former's (``build_optimizer``:
            WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0, biases decay); ``[]`` decays everything.
        inference: whole-image or sliding-window evaluation (config group ``inference``);
            ``None`` = whole image.
        gradient_clip_norm: the method's own clip of the whole model's gradient norm (Mask2Former:
            ``CLIP_GRADIENTS`` full_model, 0.01), applied when ``trainer.gradient_clip_val`` is unset;
            a trainer value wins. ``None`` = no clipping.
    """

    # False for training-free methods (evaluated without a checkpoint)
    trainable: bool = True

    def __init__(
        self,
        split: ClassSplit,
        setting: Setting,
        teacher: CLIPTeacher,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]] = None,
        lr_multipliers: Optional[Mapping[str, float]] = None,
        weight_decay_exempt: Sequence[str] = ("norm", "bias"),
        inference: Optional[SegmentationInference] = None,
        gradient_clip_norm: Optional[float] = None,
    ) -> None:
        super().__init__()
        if gradient_clip_norm is not None and not gradient_clip_norm > 0:
            raise ValueError(f"method.gradient_clip_norm={gradient_clip_norm!r}: expected a positive norm or null")
        self.gradient_clip_norm = gradient_clip_norm
        self.split = split
        self.setting = check_setting(setting)
        self.teacher = teacher
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_multipliers = dict(lr_multipliers or {})
        self.weight_decay_exempt = check_weight_decay_exempt(weight_decay_exempt)
        self.inference = inference or SegmentationInference("whole")
        self.class_names: tuple[str, ...] = split.class_names
        self.train_class_names: tuple[str, ...] = split.train_class_names(setting)
        self.unseen_class_ids: list[int] = split.unseen_class_ids
        self.ignore_index = split.ignore_index
        # text embeddings are a function of the teacher: recomputed, never checkpointed
        self.register_buffer("train_text_embeddings", teacher.encode_text(self.train_class_names), persistent=False)
        self.register_buffer("class_text_embeddings", teacher.encode_text(self.class_names), persistent=False)
        warn_identical_embeddings(self.class_names, self.class_text_embeddings)
        self.val_metric = HarmonicIoU(split.num_classes, self.unseen_class_ids, self.ignore_index)
        self.test_metric = HarmonicIoU(split.num_classes, self.unseen_class_ids, self.ignore_index)
        self.test_results: dict[str, Any] = {}
        # the loss terms of the latest training step (detached): NonFiniteLossGuard names the bad ones
        self.last_loss_terms: dict[str, Tensor] = {}
        # the config-group choices of the run (set by zeroseg.build), recorded in checkpoints for error messages
        self.run_choices: dict[str, Any] = {}
        # the run's resolved backbone and method configs (set by zeroseg.build): lets a later run rebuild
        # this model from the checkpoint alone (models.proposals)
        self.run_model_config: dict[str, Any] = {}

    # -- what a method implements ----------------------------------------------------------------
    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named loss terms of one training batch; ``"loss"`` is the total that is optimised."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses()")

    def predict_logits(self, images: Tensor, class_embeddings: Tensor) -> Tensor:
        """Dense logits ``(B, len(class_embeddings), h, w)`` of images in ``[0, 1]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_logits()")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        # the method's own clip (part of its recipe) unless the trainer sets one
        if gradient_clip_val is None and self.gradient_clip_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # -- shared helpers -------------------------------------------------------------------------
    @staticmethod
    def resize_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_logits(logits, size)

    def segment(self, images: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        """Logits over ALL classes by the configured inference mode, resized to ``size``
        (default: the input resolution)."""
        logits = self.inference(self.evaluation_logits, images)
        return self.calibrate_logits(resize_logits(logits, size if size is not None else images.shape[-2:]))

    def evaluation_logits(self, images: Tensor) -> Tensor:
        """Logits of a whole image or one window over the dataset's classes, as :meth:`segment` scores them:
        :meth:`predict_logits` against their text embeddings (a method with an evaluation-only calibration
        inside its prediction overrides this; ``zeroseg.predict`` calls :meth:`predict_logits` directly)."""
        return self.predict_logits(images, self.class_text_embeddings)

    def open_vocabulary_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """The classifier this method puts arbitrary class names through (``zeroseg.predict``): the teacher's
        template text embeddings, as for its own classes. A method that learns its text side overrides it
        (DeOP's learnt prompt context), so that prediction classifies as the method's own evaluation does."""
        return self.teacher.encode_text(class_names)

    def calibrate_logits(self, logits: Tensor) -> Tensor:
        """Evaluation-time adjustment of the logits over all classes (e.g. Chimera-Seg's γ on the
        unseen classes); never applied in training. Identity by default."""
        return logits

    def forward(self, images: Tensor) -> Tensor:
        """Logits over ALL classes at the input resolution (inference)."""
        return self.segment(images)

    # -- Lightning steps --------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.training_losses(batch)
        self.last_loss_terms = {name: value.detach() for name, value in losses.items()}
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        return losses["loss"]

    def _evaluate(self, batch: Mapping[str, Any], metric: HarmonicIoU) -> None:
        images, labels = batch["image"], batch["label"]
        if isinstance(images, Tensor) and isinstance(labels, Tensor):
            metric.update(self.segment(images, labels.shape[-2:]).argmax(dim=1), labels)
            return
        # images of different sizes (real test sets): one at a time, each at its label's size
        for image, label in zip(images, labels):
            metric.update(self.segment(image[None], label.shape[-2:]).argmax(dim=1), label[None])

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        # no per-step logging: under DDP ranks may hold different numbers of batches
        self._evaluate(batch, self.val_metric)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric)

    def _log_summary(self, stage: str, metric: HarmonicIoU) -> dict[str, Any]:
        results = metric.compute()
        metric.reset()
        scalars = {f"{stage}/{k}": float(results[k]) for k in SUMMARY_KEYS}
        # identical on every rank already (the confusion matrix was summed), so no sync here
        self.log_dict(scalars, sync_dist=False)
        per_class = results["per_class_iou"].tolist()
        return {
            **{k: float(results[k]) for k in SUMMARY_KEYS},
            "per_class_iou": {name: value for name, value in zip(self.class_names, per_class)},
        }

    def on_validation_epoch_end(self) -> None:
        results = self._log_summary("val", self.val_metric)
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            # to the console and the run's log file, where a person follows the run
            log.info(
                "validation at step %d: hIoU %.2f  sIoU %.2f  uIoU %.2f  mIoU %.2f",
                self.trainer.global_step, results["hIoU"], results["sIoU"], results["uIoU"], results["mIoU"],
            )  # fmt: skip

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_summary("test", self.test_metric)

    # -- optimisation -----------------------------------------------------------------------------
    def _lr_multiplier(self, name: str) -> float:
        best, factor = -1, 1.0
        for prefix, value in self.lr_multipliers.items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, factor = len(prefix), float(value)
        return factor

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by LR multiplier and weight-decay eligibility."""
        base = getattr(self.optimizer_factory, "keywords", {})
        base_lr, base_wd = base.get("lr"), base.get("weight_decay", 0.0)
        unknown = [p for p in self.lr_multipliers if not any(n == p or n.startswith(p + ".") for n, _ in self.named_parameters())]
        if unknown:
            raise ValueError(f"method.lr_multipliers names {unknown}, which match no parameter of {type(self).__name__}")
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        exempt = weight_decay_exempt_parameters(self, self.weight_decay_exempt)
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad or name.startswith(TEACHER_PREFIX):
                continue
            decay = id(parameter) not in exempt
            groups.setdefault((self._lr_multiplier(name), decay), []).append(parameter)
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        result = []
        for (multiplier, decay), params in groups.items():
            group: dict[str, Any] = {"params": params, "weight_decay": base_wd if decay else 0.0}
            if base_lr is not None:
                group["lr"] = base_lr * multiplier
            result.append(group)
        return result

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- checkpoint hygiene ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "method": type(self).__name__,
            "split": self.split.to_dict(),
            "setting": self.setting,
            "train_class_names": list(self.train_class_names),
            "teacher": self.teacher.describe(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TEACHER_PREFIX)}
        checkpoint["zeroseg"] = {
            **self.describe(),
            "config_choices": dict(self.run_choices),
            "model_config": dict(self.run_model_config),
        }
        checkpoint["rng_states"] = _capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("zeroseg")
        if info is None:
            raise CheckpointMismatchError("checkpoint has no 'zeroseg' entry: it was not written by a zeroseg method")
        saved_split = info["split"]
        if saved_split["name"] != self.split.name:
            # cross-dataset evaluation (COCO-Stuff -> ADE-150 / Context-60): the weights do not
            # depend on the class list; classes come from the text embeddings of the new names
            log.warning(
                "cross-dataset: checkpoint trained on '%s' (%d training classes), evaluated on '%s' (%d classes)",
                saved_split["name"], len(info["train_class_names"]), self.split.name, self.split.num_classes,
            )  # fmt: skip
        else:
            for key, current in (
                ("class_names", list(self.class_names)),
                ("unseen_class_names", list(self.split.unseen_class_names)),
            ):
                if list(saved_split[key]) != current:
                    raise CheckpointMismatchError(
                        f"checkpoint split.{key} differs from the configured dataset '{self.split.name}': "
                        f"checkpoint has {saved_split[key]}, config has {current}"
                    )
        if info["method"] != type(self).__name__:
            raise CheckpointMismatchError(
                f"checkpoint was written by method {info['method']}, config builds {type(self).__name__}"
            )
        if info["teacher"] != self.teacher.describe():
            log.warning("checkpoint teacher %s differs from the configured teacher %s", info["teacher"], self.teacher.describe())
        # strict loading expects the teacher's tensors: take them from the configured teacher
        state = checkpoint["state_dict"]
        for name, tensor in self.teacher.state_dict().items():
            state[TEACHER_PREFIX + name] = tensor
        if "rng_states" in checkpoint:
            _restore_rng_state(checkpoint["rng_states"])
