"""Class splits for zero-shot segmentation: ordered class names, the unseen subset, the ignore id,
and the label bookkeeping of the inductive and transductive settings.

Label spaces used across zeroseg:

* **full ids** ``0..C-1`` index :attr:`ClassSplit.class_names`; datasets return labels in this
  space and evaluation classifies over all of it.
* **training ids** index the names the model is given in training
  (:meth:`ClassSplit.train_class_names`): the seen classes only in the inductive setting, all
  classes in the transductive one. Unseen *pixels* are ignore in both settings: unseen labels are
  never available in training.

A third setting, ``supervised``, is not zero-shot: it trains on the labels of all classes and
exists only as the oracle (upper bound) row of benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

Setting = Literal["inductive", "transductive", "supervised"]
SETTINGS: tuple[str, ...] = ("inductive", "transductive", "supervised")

__all__ = ["ClassSplit", "Setting", "SETTINGS", "check_setting"]


def check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"dataset.setting={setting!r} is not one of {list(SETTINGS)}")
    return setting


@dataclass(frozen=True)
class ClassSplit:
    """Ordered class names of a dataset and which of them are unseen.

    Args:
        class_names: all classes, in label-id order (label value ``i`` is ``class_names[i]``).
        unseen_class_names: the unseen classes, by name; each must be one of ``class_names``.
        ignore_index: label value that marks unlabeled pixels (must not be a class id).
        name: dataset name, used in error messages and logs.
    """

    class_names: tuple[str, ...]
    unseen_class_names: tuple[str, ...]
    ignore_index: int = 255
    name: str = "dataset"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        class_names: Sequence[str],
        unseen_class_names: Sequence[str] = (),
        ignore_index: int = 255,
        name: str = "dataset",
    ) -> None:
        class_names = tuple(str(c) for c in class_names)
        unseen_class_names = tuple(str(c) for c in unseen_class_names)
        where = f"dataset '{name}'"
        if not class_names:
            raise ValueError(f"{where}: split.class_names is empty; expected the ordered list of class names")
        duplicates = sorted({c for c in class_names if class_names.count(c) > 1})
        if duplicates:
            raise ValueError(f"{where}: split.class_names lists {duplicates} more than once; names must be unique")
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [c for c in unseen_class_names if c not in index]
        if unknown:
            raise ValueError(
                f"{where}: split.unseen_class_names contains {unknown}, which are not in split.class_names "
                f"(expected a subset of {list(class_names)})"
            )
        if len(set(unseen_class_names)) != len(unseen_class_names):
            raise ValueError(f"{where}: split.unseen_class_names has duplicates: {list(unseen_class_names)}")
        if len(unseen_class_names) == len(class_names):
            raise ValueError(f"{where}: every class is unseen; at least one seen class is needed for training")
        if 0 <= ignore_index < len(class_names):
            raise ValueError(f"{where}: split.ignore_index={ignore_index} collides with a class id (0..{len(class_names) - 1})")
        object.__setattr__(self, "class_names", class_names)
        object.__setattr__(self, "unseen_class_names", unseen_class_names)
        object.__setattr__(self, "ignore_index", int(ignore_index))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_index", index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def unseen_class_ids(self) -> list[int]:
        """Full ids of the unseen classes, ascending."""
        return sorted(self._index[c] for c in self.unseen_class_names)

    @property
    def seen_class_ids(self) -> list[int]:
        unseen = set(self.unseen_class_ids)
        return [i for i in range(self.num_classes) if i not in unseen]

    @property
    def seen_class_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.seen_class_ids)

    def class_id(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"dataset '{self.name}': unknown class name {name!r}")
        return self._index[name]

    def train_class_names(self, setting: Setting) -> tuple[str, ...]:
        """Exactly the class names the model may see in training."""
        check_setting(setting)
        return self.seen_class_names if setting == "inductive" else self.class_names

    def train_label_lut(self, setting: Setting) -> Tensor:
        """Lookup table ``full id → training id`` over ``0..max(C-1, ignore_index)``.

        Unseen classes and ``ignore_index`` map to ``ignore_index`` in both zero-shot settings;
        seen classes map to their position among the seen classes (inductive) or keep their id
        (transductive). ``supervised`` (the oracle) keeps every class id.
        """
        check_setting(setting)
        size = max(self.num_classes, self.ignore_index + 1)
        lut = torch.full((size,), self.ignore_index, dtype=torch.long)
        if setting == "supervised":
            lut[: self.num_classes] = torch.arange(self.num_classes)
            return lut
        seen = torch.tensor(self.seen_class_ids, dtype=torch.long)
        lut[seen] = torch.arange(len(seen)) if setting == "inductive" else seen
        return lut

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "unseen_class_names": list(self.unseen_class_names),
            "ignore_index": self.ignore_index,
        }
