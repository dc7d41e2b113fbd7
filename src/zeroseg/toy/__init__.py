"""The toy world: everything zeroseg needs to judge a method on a CPU, in one package.

* :mod:`zeroseg.toy.scenes` — ZSS-Synth, procedural colour × pattern scenes (``dataset=synthetic``);
* :mod:`zeroseg.toy.clip` — pretraining and evaluation of the toy CLIP teacher (``clip=toy``;
  ``scripts/train_toy_clip.py`` is its command line);
* :mod:`zeroseg.toy.benchmark` — ``python -m zeroseg.benchmark toy``: every method, 3 seeds, one budget.

Layering: ``scenes`` depends on nothing in zeroseg; ``clip`` on the teacher, metric and toolkit;
only ``benchmark`` (which trains methods) imports the training entry points. This ``__init__``
exports the scenes alone, so the data layer can instantiate them without importing any method.
"""

from zeroseg.toy.scenes import SceneConfig, SyntheticScenes, check_compositional_unseen, render_scene

__all__ = ["SceneConfig", "SyntheticScenes", "check_compositional_unseen", "render_scene"]
