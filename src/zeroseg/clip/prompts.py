"""Prompt templates for class-name text embeddings.

``single`` is the template of the VOC recipes of ZegCLIP and its followers ("a photo of a {}.").
``vild`` is the 14-template ensemble of ViLD, used by MAFT and many open-vocabulary segmenters.
A config may also give its own list of templates; each must contain ``{}`` once.
"""

from __future__ import annotations

from typing import Sequence, Union

__all__ = ["TEMPLATE_SETS", "resolve_templates", "fill_templates"]

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "vild": (
        "a photo of a {}.",
        "This is a photo of a {}",
        "There is a {} in the scene",
        "There is the {} in the scene",
        "a photo of a {} in the scene",
        "a photo of a small {}.",
        "a photo of a medium {}.",
        "a photo of a large {}.",
        "This is a photo of a small {}.",
        "This is a photo of a medium {}.",
        "This is a photo of a large {}.",
        "There is a small {} in the scene.",
        "There is a medium {} in the scene.",
        "There is a large {} in the scene.",
    ),
}


def resolve_templates(templates: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """A template-set name from :data:`TEMPLATE_SETS`, or an explicit list of templates."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"clip.templates={templates!r} is not one of {sorted(TEMPLATE_SETS)} (or give a list)")
        return TEMPLATE_SETS[templates]
    resolved = tuple(str(t) for t in templates)
    if not resolved:
        raise ValueError("clip.templates is an empty list; expected at least one template")
    for template in resolved:
        if template.count("{}") != 1:
            raise ValueError(f"clip.templates: template {template!r} must contain '{{}}' exactly once")
    return resolved


def fill_templates(templates: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Prompts ordered class-major: all templates of class 0, then of class 1, …"""
    return [template.format(name) for name in class_names for template in templates]
