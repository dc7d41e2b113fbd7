"""The toy CLIP: a small open_clip model that zeroseg pretrains itself on ZSS-Synth concepts.

Real CLIP saw every concept on the web; ZSS training then sees labels of seen classes only. The
toy world reproduces that at CPU size: this module pretrains a small open_clip ``CLIP``
contrastively on image–caption pairs of **all** classes (or, as a control, the seen classes only),
from seeds disjoint from the ZSS-Synth train/val/test ranges. The pairs are

* ``concept``: an image filled with one jittered concept;
* ``region_black`` / ``region_mean``: one concept in a random shape on a black background (the
  literal masked image ``I ⊙ 1(Y = l)`` that region-CLS methods feed to CLIP) or on CLIP's mean
  colour (the crop-and-fill variant), so that the CLS token of a masked region is meaningful;
* ``scene_region``: one ground-truth region of a scene, occlusions included, black outside;
* ``crop``: a crop of a scene dominated (≥ 60 %) by one class, resized to the input size;
* ``scene``: a whole scene captioned by its majority class;

each captioned with one of several templates. The loss is CLIP's symmetric InfoNCE with all
pairs of the same class counted as positives (captions are class-level, so a batch holds many
positives per row), applied to the image embedding.

The shipped model, like real CLIP, takes the CLS token as its image embedding (``pool_type: tok``
in ``conf/clip/toy.yaml``), so the methods that read CLS tokens inside the transformer (the
one-pass ``attention`` region encoder, MAFT's IP-CLIP) run on it. With CLS pooling alone the
last block's patch tokens feed no output and stay far from the joint space (dense zero-shot mIoU
21); ``dense_loss_weight`` adds the same loss on the mean projected patch token and
``token_loss_weight`` the image-to-text loss on every patch token of the images that are one
concept everywhere (``concept`` samples: their caption is true of each patch, so this adds no
label information beyond the captions). The shipped recipe (600 steps, weights 6 and 1) keeps the
dense tokens as good as session 1's mean-pooled model's (README "The toy world" compares the
variants). ``scripts/train_toy_clip.py`` is the command line; the shipped weights are
``zeroseg/assets/toy_clip.safetensors`` (fp16), loaded by ``clip=toy`` through the same
:class:`~zeroseg.clip.teacher.CLIPTeacher` code path as real CLIP weights.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from zeroseg.clip.teacher import dense_zero_shot_logits
from zeroseg.metrics import HarmonicIoU
from zeroseg.toolkit.kmeans import batched_kmeans, sample_initial_centroids
from zeroseg.toolkit.region_tokens import encode_regions
from zeroseg.toy.scenes import SceneConfig, parse_concept, random_shape_mask, render_concept, render_scene

log = logging.getLogger(__name__)

__all__ = [
    "toy_model_cfg",
    "TOY_TEMPLATES",
    "SEED_BASES",
    "ToyPretrainingConfig",
    "render_pretraining_sample",
    "train_toy_clip",
    "save_toy_clip",
    "evaluate_toy_clip",
]


def toy_model_cfg(name: str = "toy") -> dict[str, Any]:
    """The open_clip config of the toy CLIP ``clip=<name>``, read from ``conf/clip/<name>.yaml`` (its single source).

    The prototype's sizes, except a narrower text tower (width 64) so that the 49,408-row token
    embedding keeps the shipped fp16 file small.
    """
    path = files("zeroseg") / "conf" / "clip" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no toy CLIP config conf/clip/{name}.yaml")
    node = OmegaConf.create(path.read_text())
    if "model_cfg" not in node:
        raise ValueError(f"conf/clip/{name}.yaml has no model_cfg: it is not a toy CLIP")
    return OmegaConf.to_container(node.model_cfg, resolve=True)  # type: ignore[return-value]


# caption templates of pretraining; the first is clip.templates=single
TOY_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} texture.",
    "a pattern of {}.",
    "{}",
    "a region of {}.",
    "an image of {}.",
)

# disjoint seed ranges: ZSS-Synth uses [0, 3e7) for train/val/test (conf/dataset/synthetic.yaml)
# "test" is what the pretraining script reports (and a model is chosen by); "test_suite" is used
# by tests/test_toy_world.py alone, so the thresholds the tests hold are on scenes no choice saw
SEED_BASES = {"pretrain": 30_000_000, "pretrain_eval": 35_000_000, "test": 40_000_000, "test_suite": 45_000_000}

SAMPLE_KINDS = ("concept", "region_black", "region_mean", "scene_region", "crop", "scene")
# a ground-truth region must cover this many pixels to be a pretraining or evaluation sample
MIN_REGION_PIXELS = 128
CLIP_MEAN_RGB = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_pretraining_sample(
    kind: str, class_names: Sequence[str], class_id: int, seed: int, size: int = 64
) -> tuple[np.ndarray, int]:
    """One pretraining image ``uint8 (H, W, 3)`` and its caption class id.

    ``class_id`` is the intended class of ``concept``/``region_*`` samples; ``crop`` and ``scene``
    samples are drawn from a scene of ``class_names`` and captioned by their dominant class.
    """
    rng = np.random.default_rng(seed)
    xx, yy = _grid(size)
    if kind in ("concept", "region_black", "region_mean"):
        texture = render_concept(*parse_concept(class_names[class_id]), xx, yy, rng)
        if kind == "concept":
            return _to_uint8(texture), class_id
        mask = random_shape_mask(xx, yy, rng, 0.35, 0.9)
        background = np.zeros(3, np.float32) if kind == "region_black" else CLIP_MEAN_RGB
        return _to_uint8(np.where(mask[..., None], texture, background)), class_id
    if kind == "scene":
        image, label = render_scene(class_names, seed, SceneConfig(image_size=size))
        return image, int(np.bincount(label.ravel()).argmax())
    if kind == "scene_region":
        # the literal masked image of one ground-truth region of a scene (occlusions included)
        for attempt in range(50):
            image, label = render_scene(class_names, seed * 64 + attempt, SceneConfig(image_size=size))
            counts = np.bincount(label.ravel(), minlength=len(class_names))
            candidates = np.flatnonzero(counts >= MIN_REGION_PIXELS)
            if len(candidates):
                region_class = int(rng.choice(candidates))
                return image * (label == region_class)[..., None].astype(np.uint8), region_class
        raise RuntimeError(f"no large enough region found for seed {seed}")
    if kind == "crop":
        big = size * 2
        for attempt in range(50):
            image, label = render_scene(class_names, seed * 64 + attempt, SceneConfig(image_size=big))
            side = int(rng.integers(size // 2, big // 2 + 1))
            top, left = rng.integers(0, big - side + 1, size=2)
            crop_label = label[top : top + side, left : left + side]
            counts = np.bincount(crop_label.ravel(), minlength=len(class_names))
            if counts.max() >= 0.6 * crop_label.size:
                crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
                return np.asarray(crop), int(counts.argmax())
        raise RuntimeError(f"no dominated crop found for seed {seed}")
    raise ValueError(f"unknown pretraining sample kind {kind!r}; expected one of {SAMPLE_KINDS}")


@dataclass
class ToyPretrainingConfig:
    """Knobs of :func:`train_toy_clip` (the defaults are the shipped model's)."""

    steps: int = 600
    batch_size: int = 128
    bank_size: int = 12_800
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    kind_weights: tuple[float, ...] = (0.2, 0.15, 0.1, 0.2, 0.2, 0.15)  # order of SAMPLE_KINDS
    dense_loss_weight: float = 6.0
    token_loss_weight: float = 1.0
    eval_every: int = 50
    eval_images: int = 160


def _build_bank(class_names: Sequence[str], config: ToyPretrainingConfig, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    rng = np.random.default_rng([SEED_BASES["pretrain"], config.seed])
    kinds = rng.choice(len(SAMPLE_KINDS), size=config.bank_size, p=np.array(config.kind_weights) / sum(config.kind_weights))
    class_ids = rng.integers(len(class_names), size=config.bank_size)
    images = np.empty((config.bank_size, image_size, image_size, 3), dtype=np.uint8)
    captions = np.empty(config.bank_size, dtype=np.int64)
    for index in range(config.bank_size):
        seed = SEED_BASES["pretrain"] + config.seed * 1_000_000 + index
        images[index], captions[index] = render_pretraining_sample(
            SAMPLE_KINDS[kinds[index]], class_names, int(class_ids[index]), seed, image_size
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(captions), torch.from_numpy(kinds)


def _normalize(images_uint8: Tensor) -> Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


@torch.no_grad()
def _text_classifier(model: open_clip.CLIP, tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    prompts = [t.format(n) for n in class_names for t in templates]
    embeddings = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(1), dim=-1)


@torch.no_grad()
def _crop_accuracy(model: open_clip.CLIP, tokenizer, class_names: Sequence[str], images: Tensor, labels: Tensor) -> float:
    model.eval()
    classifier = _text_classifier(model, tokenizer, class_names, TOY_TEMPLATES[:1])
    predictions = (F.normalize(model.encode_image(_normalize(images)), dim=-1) @ classifier.t()).argmax(1)
    model.train()
    return float((predictions == labels).float().mean() * 100)


def train_toy_clip(
    class_names: Sequence[str],
    pretrain_class_names: Optional[Sequence[str]] = None,
    config: Optional[ToyPretrainingConfig] = None,
    model_cfg: Optional[dict[str, Any]] = None,
) -> tuple[open_clip.CLIP, dict[str, Any]]:
    """Pretrain the toy CLIP; returns the model (fp32, eval mode) and a training report.

    ``pretrain_class_names`` restricts the concepts seen in pretraining (the control CLIP that
    never saw the unseen classes); by default all ``class_names`` are used. Deterministic on
    CPU for a given seed and thread count.
    """
    config = config or ToyPretrainingConfig()
    model_cfg = copy.deepcopy(model_cfg or toy_model_cfg())
    pretrain_names = list(pretrain_class_names or class_names)
    unknown = [n for n in pretrain_names if n not in class_names]
    if unknown:
        raise ValueError(f"pretraining classes {unknown} are not among the class names")
    torch.manual_seed(config.seed)
    model = open_clip.CLIP(**model_cfg)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    image_size = model_cfg["vision_cfg"]["image_size"]
    started = time.perf_counter()
    bank_images, bank_captions, bank_kinds = _build_bank(pretrain_names, config, image_size)
    bank_seconds = time.perf_counter() - started
    # (class, template) token table: caption i of class c is row c * T + t
    caption_tokens = tokenizer([t.format(n) for n in pretrain_names for t in TOY_TEMPLATES])
    eval_rng_seed = SEED_BASES["pretrain_eval"] + config.seed * 1_000_000
    eval_samples = [
        render_pretraining_sample("concept", class_names, i % len(class_names), eval_rng_seed + i, image_size)
        for i in range(config.eval_images)
    ]
    eval_images = torch.from_numpy(np.stack([s[0] for s in eval_samples])).permute(0, 3, 1, 2)
    eval_labels = torch.tensor([s[1] for s in eval_samples])

    parameters = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()
    for step in range(config.steps):
        index = torch.randint(len(bank_images), (config.batch_size,), generator=generator)
        template = torch.randint(len(TOY_TEMPLATES), (config.batch_size,), generator=generator)
        captions = bank_captions[index]
        visual = model.visual
        visual.output_tokens = True
        pooled, tokens = visual(_normalize(bank_images[index]))
        visual.output_tokens = False
        text_features = F.normalize(model.encode_text(caption_tokens[captions * len(TOY_TEMPLATES) + template]), dim=-1)
        # every pair of the same class is a positive (class-level captions)
        positives = (captions[:, None] == captions[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True)
        scale = model.logit_scale.exp().clamp(max=100)

        def contrastive(image_features: Tensor) -> Tensor:
            logits = scale * F.normalize(image_features, dim=-1) @ text_features.t()
            image_to_text = torch.sum(-targets * logits.log_softmax(1), 1).mean()
            return 0.5 * (image_to_text + torch.sum(-targets * logits.t().log_softmax(1), 1).mean())

        loss = contrastive(pooled)
        if config.dense_loss_weight:
            loss = loss + config.dense_loss_weight * contrastive((tokens @ visual.proj).mean(dim=1))
        single_concept = bank_kinds[index] == SAMPLE_KINDS.index("concept")
        if config.token_loss_weight and bool(single_concept.any()):
            # an image that is one concept everywhere: its caption is true of every patch token
            patch_logits = scale * F.normalize(tokens[single_concept] @ visual.proj, dim=-1) @ text_features.t()
            patch_targets = targets[single_concept].unsqueeze(1).expand_as(patch_logits)
            token_loss = torch.sum(-patch_targets * patch_logits.log_softmax(-1), -1).mean()
            loss = loss + config.token_loss_weight * token_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            accuracy = _crop_accuracy(model, tokenizer, class_names, eval_images, eval_labels)
            history.append({"step": step + 1, "loss": float(loss.detach()), "crop_accuracy": accuracy})
            log.info("toy CLIP step %d: loss %.3f, zero-shot crop accuracy %.1f%%", step + 1, float(loss.detach()), accuracy)
    model.eval()
    report = {
        "steps": config.steps,
        "batch_size": config.batch_size,
        "bank_size": config.bank_size,
        "bank_seconds": bank_seconds,
        "train_seconds": time.perf_counter() - started - bank_seconds,
        "pretrain_class_names": pretrain_names,
        "history": history,
    }
    return model, report


def save_toy_clip(model: open_clip.CLIP, path: str | Path) -> Path:
    """Save the weights as fp16 safetensors (the shipped format; loaded into an fp32 model)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@torch.no_grad()
def evaluate_toy_clip(
    teacher,
    class_names: Sequence[str],
    unseen_class_names: Sequence[str],
    num_images: int = 320,
    kmeans_clusters: int = 4,
    image_size: int = 64,
    seed_base: int = SEED_BASES["test"],
) -> dict[str, float]:
    """Zero-shot quality of a toy CLIP on fresh data (seeds from ``seed_base``, by default ``SEED_BASES['test']``).

    Returns, in percent: crop accuracy over seen/unseen classes; accuracy of the CLS token of
    ground-truth regions (at least ``MIN_REGION_PIXELS`` pixels) cut from fresh scenes with the
    literal masked-image input (black outside); best-match IoU of K-means pseudo masks from the dense tokens (each ground-truth
    region matched to its best cluster, averaged over regions); dense zero-shot mIoU/hIoU; for a
    CLS-pooled teacher also the accuracy of the same regions through the one-pass ``attention``
    region encoder (:func:`~zeroseg.toolkit.region_tokens.encode_regions`).
    """
    unseen = {class_names.index(n) for n in unseen_class_names}
    text = teacher.encode_text(class_names)
    base = seed_base

    def split_accuracy(predictions: Tensor, labels: Tensor) -> dict[str, float]:
        is_unseen = torch.tensor([int(label) in unseen for label in labels])
        correct = (predictions == labels).float()
        return {"seen": float(correct[~is_unseen].mean() * 100), "unseen": float(correct[is_unseen].mean() * 100)}

    crops = [
        render_pretraining_sample("concept", class_names, i % len(class_names), base + i, image_size) for i in range(num_images)
    ]
    crop_images = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float() / 255
    crop_labels = torch.tensor([c[1] for c in crops])
    crop_predictions = (F.normalize(teacher.encode_image(crop_images)[0], dim=-1) @ text.t()).argmax(1)
    crop = split_accuracy(crop_predictions, crop_labels)

    scenes = [render_scene(class_names, base + 500_000 + i, SceneConfig(image_size=image_size)) for i in range(num_images // 4)]
    scene_images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 255
    scene_labels = torch.from_numpy(np.stack([s[1] for s in scenes]))
    region_images, region_labels = [], []
    for image, label in zip(scene_images, scene_labels):
        for class_id in torch.unique(label).tolist():
            mask = label == class_id
            if int(mask.sum()) >= MIN_REGION_PIXELS:
                region_images.append(image * mask)
                region_labels.append(class_id)
    region_predictions = (F.normalize(teacher.encode_image(torch.stack(region_images))[0], dim=-1) @ text.t()).argmax(1)
    region = split_accuracy(region_predictions, torch.tensor(region_labels))
    attention_region = {}
    if teacher.model.visual.pool_type == "tok":
        # the same regions through the one-pass IP-CLIP-style encoder (CLS copies attend to their patches)
        regions = encode_regions(teacher, scene_images, scene_labels, "attention", min_pixels=MIN_REGION_PIXELS)
        predictions = (F.normalize(regions.tokens[regions.valid], dim=-1) @ text.t()).argmax(1)
        attention_region = split_accuracy(predictions, regions.labels[regions.valid])

    _, dense = teacher.encode_image(scene_images)
    batch, dim, grid_h, grid_w = dense.shape
    points = dense.flatten(2).transpose(1, 2)
    valid = torch.ones(points.shape[:2], dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    centroids, centroid_valid = sample_initial_centroids(points, valid, kmeans_clusters, generator)
    assignment, _, _ = batched_kmeans(points, valid, centroids, centroid_valid, iterations=10)
    cluster_maps = F.one_hot(assignment.view(batch, grid_h, grid_w), kmeans_clusters).permute(0, 3, 1, 2).float()
    cluster_maps = F.interpolate(cluster_maps, size=scene_labels.shape[-2:], mode="nearest").bool()  # (B, K, H, W)
    truth = F.one_hot(scene_labels, len(class_names)).permute(0, 3, 1, 2).bool()  # (B, C, H, W)
    intersection = torch.einsum("bkhw,bchw->bkc", cluster_maps.float(), truth.float())
    union = cluster_maps.sum((2, 3))[:, :, None] + truth.sum((2, 3))[:, None, :] - intersection
    best_iou = (intersection / union.clamp_min(1)).max(dim=1).values  # (B, C)
    present = truth.any(dim=(2, 3))
    pseudo_mask_iou = float(best_iou[present].mean() * 100)

    metric = HarmonicIoU(len(class_names), sorted(unseen))
    logits = dense_zero_shot_logits(teacher, scene_images, text)
    metric.update(F.interpolate(logits, size=scene_labels.shape[-2:], mode="bilinear").argmax(1), scene_labels)
    dense_metrics = metric.compute()
    return {
        "crop_accuracy_seen": crop["seen"],
        "crop_accuracy_unseen": crop["unseen"],
        "masked_region_accuracy_seen": region["seen"],
        "masked_region_accuracy_unseen": region["unseen"],
        **{f"attention_region_accuracy_{split}": value for split, value in attention_region.items()},
        "kmeans_best_match_iou": pseudo_mask_iou,
        "dense_zero_shot_mIoU": float(dense_metrics["mIoU"]),
        "dense_zero_shot_hIoU": float(dense_metrics["hIoU"]),
    }
