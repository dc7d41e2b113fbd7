"""ZSS-Synth: procedural zero-shot segmentation scenes (the embedded toy world).

Every class is a visual concept with a compositional name, a colour and a pattern
("red stripes", "blue noise"). A scene is a background region of one class plus a few shapes of
other classes; the label map records which class painted each pixel. Every concept is drawn with
random jitter (hue, saturation, brightness, scale, phase, orientation), so no class is a constant
colour. Scenes are a pure function of ``(seed_base + index)``: deterministic, generated on the fly
and cached in memory as uint8.

The split into seen/unseen classes lives in the dataset config (``conf/dataset/synthetic.yaml``);
:func:`check_compositional_unseen` verifies that every unseen colour and pattern also occurs in a
seen class, so the unseen concepts are new *combinations* of seen parts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "COLOURS",
    "PATTERNS",
    "SceneConfig",
    "SyntheticScenes",
    "parse_concept",
    "random_shape_mask",
    "render_concept",
    "render_scene",
    "check_compositional_unseen",
]

# Hue in degrees of each colour word.
COLOURS: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 120.0,
    "cyan": 182.0,
    "blue": 228.0,
    "purple": 275.0,
    "pink": 322.0,
}

PatternFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _rotated(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    theta = rng.uniform(0, np.pi)
    return xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)


def _stripes(xx, yy, rng):
    u, _ = _rotated(xx, yy, rng)
    period = rng.uniform(3.5, 6.0)
    return (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _dots(xx, yy, rng):
    u, v = _rotated(xx, yy, rng)
    period = rng.uniform(5.0, 8.0)
    du = (u + rng.uniform(0, period)) % period - period / 2
    dv = (v + rng.uniform(0, period)) % period - period / 2
    return (du**2 + dv**2 < (period * rng.uniform(0.25, 0.33)) ** 2).astype(np.float32)


def _checks(xx, yy, rng):
    u, v = _rotated(xx, yy, rng)
    cell = rng.uniform(3.0, 5.5)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _noise(xx, yy, rng):
    cell = rng.uniform(2.5, 4.0)
    height, width = xx.shape
    lattice = rng.random((int(height / cell) + 3, int(width / cell) + 3))
    gy, gx = yy / cell, xx / cell
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = gy - y0, gx - x0
    top = lattice[y0, x0] * (1 - fx) + lattice[y0, x0 + 1] * fx
    bottom = lattice[y0 + 1, x0] * (1 - fx) + lattice[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _rings(xx, yy, rng):
    height, width = xx.shape
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    period = rng.uniform(4.0, 6.5)
    return (np.sin(2 * np.pi * radius / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _grid(xx, yy, rng):
    u, v = _rotated(xx, yy, rng)
    period = rng.uniform(5.0, 8.0)
    width = rng.uniform(1.2, 1.8)
    on_line = ((u + rng.uniform(0, period)) % period < width) | ((v + rng.uniform(0, period)) % period < width)
    return on_line.astype(np.float32)


def _waves(xx, yy, rng):
    u, v = _rotated(xx, yy, rng)
    period = rng.uniform(4.0, 6.0)
    amplitude, wavelength = rng.uniform(1.5, 3.0), rng.uniform(10.0, 16.0)
    phase = np.sin(2 * np.pi * u / wavelength) * amplitude
    return (np.sin(2 * np.pi * (v + phase) / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)


def _solid(xx, yy, rng):
    u, _ = _rotated(xx, yy, rng)
    # a gentle shading gradient so that "solid" is not a constant either
    span = max(xx.shape)
    return (0.75 + 0.25 * (u - u.min()) / span * rng.uniform(0.5, 1.0)).astype(np.float32)


PATTERNS: dict[str, PatternFn] = {
    "stripes": _stripes,
    "dots": _dots,
    "checks": _checks,
    "noise": _noise,
    "rings": _rings,
    "grid": _grid,
    "waves": _waves,
    "solid": _solid,
}


def parse_concept(class_name: str) -> tuple[str, str]:
    """``"red stripes"`` → ``("red", "stripes")``; unknown words raise naming the vocabulary."""
    parts = class_name.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in PATTERNS:
        raise ValueError(
            f"synthetic class name {class_name!r} is not '<colour> <pattern>' with colour in "
            f"{list(COLOURS)} and pattern in {list(PATTERNS)}"
        )
    return parts[0], parts[1]


def check_compositional_unseen(class_names: Sequence[str], unseen_class_names: Sequence[str]) -> None:
    """Every unseen colour and every unseen pattern must also occur in some seen class."""
    unseen = set(unseen_class_names)
    seen_parts = [parse_concept(c) for c in class_names if c not in unseen]
    seen_colours = {colour for colour, _ in seen_parts}
    seen_patterns = {pattern for _, pattern in seen_parts}
    for name in unseen_class_names:
        colour, pattern = parse_concept(name)
        if colour not in seen_colours or pattern not in seen_patterns:
            raise ValueError(
                f"synthetic unseen class {name!r}: its colour {colour!r} and pattern {pattern!r} must each occur "
                "in some seen class, so that unseen classes are new combinations of seen parts"
            )


def _hsv_to_rgb(hue: float, saturation: float, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB for one hue/saturation and a value map; returns (H, W, 3) in [0, 1]."""
    h = (hue % 360.0) / 60.0
    chroma = value * saturation
    x = chroma * (1 - abs(h % 2 - 1))
    zero = np.zeros_like(value)
    sector = int(h) % 6
    rgb = [
        (chroma, x, zero),
        (x, chroma, zero),
        (zero, chroma, x),
        (zero, x, chroma),
        (x, zero, chroma),
        (chroma, zero, x),
    ][sector]
    offset = value - chroma
    return np.stack([channel + offset for channel in rgb], axis=-1)


def render_concept(colour: str, pattern: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One jittered instance of a concept on the pixel grid ``(xx, yy)``: float RGB ``(H, W, 3)`` in [0, 1]."""
    modulation = PATTERNS[pattern](xx, yy, rng)
    low, high = rng.uniform(0.22, 0.38), rng.uniform(0.85, 1.0)
    value = low + (high - low) * modulation
    hue = COLOURS[colour] + rng.uniform(-8.0, 8.0)
    return _hsv_to_rgb(hue, rng.uniform(0.65, 0.95), value)


def random_shape_mask(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator, min_size: float, max_size: float) -> np.ndarray:
    """A random ellipse, rotated rectangle or triangle whose extent is ``min_size..max_size`` of the image."""
    height, width = xx.shape
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    ry = rng.uniform(min_size, max_size) * height / 2
    rx = rng.uniform(min_size, max_size) * width / 2
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if kind == 1:  # rotated rectangle
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    # triangle: apex up in the rotated frame
    return (v <= ry) & (v >= -ry) & (np.abs(u) <= rx * (ry - v) / (2 * ry))


@dataclass(frozen=True)
class SceneConfig:
    """How ZSS-Synth scenes are drawn (``dataset.train_dataset.scene`` in the config).

    Attributes:
        image_size: side of the square image, in pixels.
        min_shapes / max_shapes: shapes painted over the background class (each of another class).
        min_shape_size / max_shape_size: shape extent as a fraction of the image side.
        min_visible_pixels: a shape with fewer visible pixels is redrawn.
        pixel_noise: standard deviation of the Gaussian noise added to the image (in [0, 1] units).
    """

    image_size: int = 64
    min_shapes: int = 2
    max_shapes: int = 4
    min_shape_size: float = 0.3
    max_shape_size: float = 0.65
    min_visible_pixels: int = 16
    pixel_noise: float = 0.02

    @classmethod
    def from_mapping(cls, options: Union["SceneConfig", Mapping[str, Any], None]) -> "SceneConfig":
        if options is None or isinstance(options, SceneConfig):
            return options or cls()
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"synthetic scene options {unknown} are unknown; expected some of {[f.name for f in fields(cls)]}")
        return cls(**dict(options))


def render_scene(class_names: Sequence[str], seed: int, scene: Optional[SceneConfig] = None) -> tuple[np.ndarray, np.ndarray]:
    """One scene as ``(image uint8 (H, W, 3), label int64 (H, W))`` from ``seed`` alone.

    A background class fills the image; ``scene.min_shapes..max_shapes`` shapes of other,
    distinct classes are painted on top in order (later shapes occlude earlier ones). A shape
    that ends up with fewer than ``scene.min_visible_pixels`` visible pixels is redrawn so that
    every class named in a scene is really in it.
    """
    scene = scene or SceneConfig()
    concepts = [parse_concept(c) for c in class_names]
    num_shapes_max = min(scene.max_shapes, len(class_names) - 1)
    if num_shapes_max < scene.min_shapes:
        raise ValueError(f"synthetic: {len(class_names)} classes cannot fill a background plus {scene.min_shapes} shapes")
    rng = np.random.default_rng(seed)
    size = scene.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    num_shapes = int(rng.integers(scene.min_shapes, num_shapes_max + 1))
    classes = rng.choice(len(class_names), size=num_shapes + 1, replace=False)
    image = render_concept(*concepts[classes[0]], xx, yy, rng)
    label = np.full((size, size), classes[0], dtype=np.int64)
    for class_id in classes[1:]:
        for _attempt in range(20):
            mask = random_shape_mask(xx, yy, rng, scene.min_shape_size, scene.max_shape_size)
            if mask.sum() >= scene.min_visible_pixels:
                break
        texture = render_concept(*concepts[class_id], xx, yy, rng)
        image[mask] = texture[mask]
        label[mask] = class_id
    image = image + rng.normal(0.0, scene.pixel_noise, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


class SyntheticScenes(Dataset):
    """A split of ZSS-Synth: ``num_images`` scenes with seeds ``seed_base .. seed_base+num_images-1``.

    Items are dicts ``{"image": float32 (3, H, W) in [0, 1], "label": int64 (H, W)}`` with labels in
    the full class-id space of ``class_names``. Scenes are cached in memory (uint8) after the first
    access when ``cache`` is set. ``unseen_class_names``, when given, must be compositional
    (:func:`check_compositional_unseen`).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        num_images: int,
        seed_base: int,
        scene: Union[SceneConfig, Mapping[str, Any], None] = None,
        cache: bool = True,
        unseen_class_names: Sequence[str] = (),
    ) -> None:
        for name in class_names:
            parse_concept(name)
        check_compositional_unseen(class_names, unseen_class_names)
        if num_images < 1:
            raise ValueError(f"synthetic dataset with seed_base={seed_base}: num_images={num_images}, expected >= 1")
        self.class_names = list(class_names)
        self.num_images = int(num_images)
        self.seed_base = int(seed_base)
        self.scene_config = SceneConfig.from_mapping(scene)
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def seed_range(self) -> range:
        return range(self.seed_base, self.seed_base + self.num_images)

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"synthetic scene index {index} out of range 0..{self.num_images - 1}")
        if index in self._cache:
            return self._cache[index]
        scene = render_scene(self.class_names, self.seed_base + index, self.scene_config)
        if self.cache:
            self._cache[index] = scene
        return scene

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.scene(index)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "label": torch.from_numpy(label),
        }
