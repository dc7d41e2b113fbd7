"""The four zero-shot segmentation benchmarks' class lists, unseen sets and name variants.

Encoded from the standard splits (SPNet / ZegFormer / ZegCLIP protocol; Context-59 from ZS3Net's
unseen set with OTSeg's configuration; see ``docs/data.md``):

=============  =======  ====  ======  ==========================================================
benchmark      classes  seen  unseen  background
=============  =======  ====  ======  ==========================================================
voc            20       15    5       raw 0 ignored (mmseg ``reduce_zero_label``)
coco_stuff     171      156   15      none (255 = unlabeled)
context59      59       49    10      raw 0 ignored
context60      60       50    10      raw 0 kept as class ``background`` (cross-dataset eval)
ade150         150      150   0       raw 0 ("other") ignored; evaluation only
=============  =======  ====  ======  ==========================================================

Class order is label-id order after the reader's remapping (see :mod:`zeroseg.data.folders`).

Spelling changes text embeddings ("tvmonitor" and "tv monitor" are different prompts), so the
reference spelling of each list is kept exactly as the published configs have it, and
:func:`benchmark_split` can switch to a readable spelling or apply any renaming; the chosen names
are what the model is prompted with and what results tables show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

from zeroseg.data.splits import ClassSplit

__all__ = [
    "BENCHMARKS",
    "BenchmarkClasses",
    "COCO_STUFF_RAW_NAMES",
    "COCO_STUFF_UNUSED_RAW_NAMES",
    "NameStyle",
    "benchmark_split",
]

NameStyle = Literal["reference", "readable"]

VOC_CLASSES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
    'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor',
)  # fmt: skip

# The official COCO-Stuff label list: id = raw stuffthingmaps value + 1; 91 thing ids (11 never
# annotated) followed by 91 stuff ids. The 171 used ids, in order, are the training ids 0..170.
COCO_THING_RAW_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'street sign', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'hat', 'backpack', 'umbrella', 'shoe',
    'eye glasses', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle', 'plate',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed',
    'mirror', 'dining table', 'window', 'desk', 'toilet', 'door', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'blender', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'hair brush',
)  # fmt: skip
COCO_STUFF_RAW_STUFF_NAMES = (
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard',
    'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain',
    'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile',
    'floor-wood', 'flower', 'fog', 'food-other', 'fruit', 'furniture-other', 'grass', 'gravel',
    'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain',
    'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform',
    'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea',
    'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw',
    'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other',
    'waterdrops', 'window-blind', 'window-other', 'wood',
)  # fmt: skip
COCO_STUFF_RAW_NAMES: tuple[str, ...] = COCO_THING_RAW_NAMES + COCO_STUFF_RAW_STUFF_NAMES
COCO_STUFF_UNUSED_RAW_NAMES = frozenset(
    {"street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door", "blender", "hair brush"}
)
COCO_STUFF_CLASSES = tuple(n for n in COCO_STUFF_RAW_NAMES if n not in COCO_STUFF_UNUSED_RAW_NAMES)

CONTEXT59_CLASSES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup',
    'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard',
    'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'pottedplant', 'road', 'rock',
    'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree',
    'truck', 'tv monitor', 'wall', 'water', 'window', 'wood',
)  # fmt: skip
# ZegCLIP's 60-class list spells the TV class "tvmonitor"; OTSeg's 59-class list "tv monitor"
CONTEXT60_CLASSES = ("background",) + tuple("tvmonitor" if n == "tv monitor" else n for n in CONTEXT59_CLASSES)

ADE150_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column',
    'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway',
    'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land',
    'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)  # fmt: skip

# spellings that differ between public configs; "readable" uses the values
_PASCAL_READABLE = {"tvmonitor": "tv monitor", "pottedplant": "potted plant", "diningtable": "dining table"}
_COCO_READABLE = {
    n: n.rsplit("-", 1)[0]
    for n in COCO_STUFF_CLASSES
    if n.endswith(("-other", "-stuff")) and n.rsplit("-", 1)[0] not in COCO_STUFF_CLASSES
}


@dataclass(frozen=True)
class BenchmarkClasses:
    """One benchmark's ordered classes (reference spelling), unseen set and spelling variants."""

    name: str
    class_names: tuple[str, ...]
    unseen_class_names: tuple[str, ...]
    readable_names: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def names(self, style: NameStyle = "reference") -> tuple[str, ...]:
        if style == "reference":
            return self.class_names
        if style == "readable":
            return tuple(self.readable_names.get(n, n) for n in self.class_names)
        raise ValueError(f"benchmark '{self.name}': names={style!r} is not one of ['reference', 'readable']")


BENCHMARKS: dict[str, BenchmarkClasses] = {
    "voc": BenchmarkClasses(
        "voc",
        VOC_CLASSES,
        ("pottedplant", "sheep", "sofa", "train", "tvmonitor"),
        _PASCAL_READABLE,
        "ZegCLIP voc12 configs (SPNet split)",
    ),
    "coco_stuff": BenchmarkClasses(
        "coco_stuff",
        COCO_STUFF_CLASSES,
        (
            "cow",
            "giraffe",
            "suitcase",
            "frisbee",
            "skateboard",
            "carrot",
            "scissors",
            "cardboard",
            "clouds",
            "grass",
            "playingfield",
            "river",
            "road",
            "tree",
            "wall-concrete",
        ),  # fmt: skip
        _COCO_READABLE,
        "ZegCLIP coco-stuff configs (SPNet split)",
    ),
    "context59": BenchmarkClasses(
        "context59",
        CONTEXT59_CLASSES,
        ("cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tv monitor", "keyboard", "aeroplane"),
        {"pottedplant": "potted plant"},
        "OTSeg context configs (ZS3Net unseen set)",
    ),
    "context60": BenchmarkClasses(
        "context60",
        CONTEXT60_CLASSES,
        ("cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard", "aeroplane"),
        _PASCAL_READABLE,
        "ZegCLIP context60 (background kept as a class)",
    ),
    "ade150": BenchmarkClasses("ade150", ADE150_CLASSES, (), {}, "mmseg ADE20K names (cross-dataset, no unseen)"),
}


def benchmark_split(
    benchmark: str,
    names: NameStyle = "reference",
    rename: Optional[Mapping[str, str]] = None,
    unseen_class_names: Optional[Sequence[str]] = None,
    ignore_index: int = 255,
) -> ClassSplit:
    """The :class:`ClassSplit` of a benchmark, with the chosen class-name spelling.

    Args:
        benchmark: one of :data:`BENCHMARKS` (``voc``, ``coco_stuff``, ``context59``, ``context60``,
            ``ade150``).
        names: ``reference`` (the published configs' spelling) or ``readable``
            ("tvmonitor" → "tv monitor", "building-other" → "building").
        rename: further ``{name: new name}`` changes, applied after ``names``; keys must be
            class names of that spelling.
        unseen_class_names: replace the standard unseen set (given in the final spelling).
        ignore_index: label value of unlabeled pixels.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark!r} is unknown; expected one of {sorted(BENCHMARKS)}")
    classes = BENCHMARKS[benchmark]
    styled = classes.names(names)
    to_styled = dict(zip(classes.class_names, styled))
    rename = dict(rename or {})
    unknown = [k for k in rename if k not in styled]
    if unknown:
        raise ValueError(
            f"benchmark '{benchmark}': split.rename keys {unknown} are not class names (names={names!r} spelling: {list(styled)})"
        )
    final = tuple(rename.get(n, n) for n in styled)
    if unseen_class_names is None:
        unseen = tuple(rename.get(to_styled[n], to_styled[n]) for n in classes.unseen_class_names)
    else:
        unseen = tuple(unseen_class_names)
    return ClassSplit(final, unseen, ignore_index=ignore_index, name=benchmark)
