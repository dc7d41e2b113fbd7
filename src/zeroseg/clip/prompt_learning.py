"""Prompt learning on the frozen CLIP teacher (DeOP, Han et al. ICCV 2023, Sec. 3.2, App. B, Table 7).

* :class:`VisualPrompts` — visual prompt tuning (VPT, Jia et al. 2022) on the teacher's visual tower:
  ``adding`` (one learnable prompt per patch embedding, added element-wise; DeOP's choice),
  ``prepending`` (P learnable tokens inserted after the CLS token), and the public DeOP recipe's
  learnable position embeddings added at the input and before chosen blocks. Its output is a
  :class:`~zeroseg.clip.teacher.VisualPromptTensors` for :func:`~zeroseg.clip.teacher.visual_forward`.
* :class:`TextPromptLearner` — CoOp (Zhou et al. 2022) learnable text context trained end to end ("online
  text prompt learning"), initialised from the template's own token embeddings, from a saved context or
  at random, with a gradient-enabled forward through the frozen text tower.

Neither module holds the teacher: the teacher is passed to every call, so its weights are never part of a
method's state dict (the method base keeps them out of checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroseg.clip.teacher import VisualPromptTensors, resolve_layer_indices
from zeroseg.utils.weights import read_weight_file

__all__ = ["TextPromptLearner", "VisualPrompts", "VISUAL_PROMPT_MODES", "CONTEXT_INITS"]

VisualPromptMode = Literal["none", "adding", "prepending"]
VISUAL_PROMPT_MODES: tuple[str, ...] = ("none", "adding", "prepending")
ContextInit = Literal["template", "random", "file"]
CONTEXT_INITS: tuple[str, ...] = ("template", "random", "file")


def _resize_grid_table(table: Tensor, base_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """A ``(h0·w0, C)`` table on ``base_grid`` resized bicubically to ``grid`` → ``(h·w, C)`` (as CLIP's
    position embeddings are)."""
    if tuple(base_grid) == tuple(grid):
        return table
    image = table.reshape(1, *base_grid, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
    return image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


class VisualPrompts(nn.Module):
    """Learnable visual prompts and position embeddings of the teacher's visual tower (Sec. 3.2, App. B).

    Args:
        width: the tower's token width (768 for ViT-B/16).
        base_grid: the token grid the per-patch tables are learnt on (the tower's native grid, e.g. 14×14
            for 224-px ViT-B/16); other grids get them bicubically resized, as CLIP's position embeddings.
        mode: ``adding`` (a prompt per patch added element-wise: Table 7 "Vision A.", DeOP's choice),
            ``prepending`` (``num_tokens`` prompt tokens after the CLS token: "Vision P.") or ``none``.
        num_tokens: prepended prompts (VPT; the paper does not give P: default 10, VPT's shallow default).
        position_layers: learnable position embeddings (the public DeOP recipe: ``[0, 1, 2, 3, 4, 5]``):
            ``0`` adds one at the input (with CLIP's own, before ``ln_pre``), ``l ≥ 1`` before block ``l``
            (0-based; negative from the end). ``[]`` = none (the paper's description).
        num_layers: blocks of the tower (to resolve negative indices).
        init_std: normal init of the prepended tokens (VPT-style small values; the paper is silent:
            default 0.02). Added prompts and position embeddings start at zero, so an untrained model is
            the frozen teacher exactly (the paper's "slightly steer").
    """

    def __init__(
        self,
        width: int,
        base_grid: tuple[int, int],
        num_layers: int,
        mode: VisualPromptMode = "adding",
        num_tokens: int = 10,
        position_layers: Sequence[int] = (),
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if mode not in VISUAL_PROMPT_MODES:
            raise ValueError(f"method.visual_prompts.mode={mode!r} is not one of {list(VISUAL_PROMPT_MODES)}")
        if mode == "prepending" and num_tokens < 1:
            raise ValueError(f"method.visual_prompts.num_tokens={num_tokens!r}: prepending needs at least one token")
        self.mode = mode
        self.base_grid = (int(base_grid[0]), int(base_grid[1]))
        patches = self.base_grid[0] * self.base_grid[1]
        self.patch_prompts: Optional[nn.Parameter] = None
        self.prepended_prompts: Optional[nn.Parameter] = None
        if mode == "adding":
            self.patch_prompts = nn.Parameter(torch.zeros(patches, width))
        elif mode == "prepending":
            self.prepended_prompts = nn.Parameter(torch.randn(num_tokens, width) * init_std)
        # 0 = the input; other entries are block indices, resolved against the tower
        input_position = any(int(layer) == 0 for layer in position_layers)
        blocks = resolve_layer_indices([layer for layer in position_layers if int(layer) != 0], num_layers, "method.visual_prompts.position_layers")
        self.position_blocks: list[int] = sorted(set(blocks))
        keys = (["input"] if input_position else []) + [str(block) for block in self.position_blocks]
        self.positions = nn.ParameterDict({key: nn.Parameter(torch.zeros(1 + patches, width)) for key in keys})

    def _at_grid(self, table: Tensor, grid: tuple[int, int], with_cls: bool) -> Tensor:
        if not with_cls:
            return _resize_grid_table(table, self.base_grid, grid)
        return torch.cat([table[:1], _resize_grid_table(table[1:], self.base_grid, grid)])

    def forward(self, grid: tuple[int, int]) -> VisualPromptTensors:
        """The prompt tensors for a forward on the token grid ``grid``."""
        input_addition = None
        if "input" in self.positions:
            input_addition = self._at_grid(self.positions["input"], grid, with_cls=True)
        if self.patch_prompts is not None:
            patch = self._at_grid(self.patch_prompts, grid, with_cls=False)
            patch = torch.cat([patch.new_zeros(1, patch.shape[1]), patch])  # the CLS token gets no prompt
            input_addition = patch if input_addition is None else input_addition + patch
        layer_additions = {block: self._at_grid(self.positions[str(block)], grid, with_cls=True) for block in self.position_blocks}
        return VisualPromptTensors(input_addition, self.prepended_prompts, layer_additions)


class TextPromptLearner(nn.Module):
    """CoOp text context learnt end to end with the segmentation loss (DeOP Sec. 3.2, "online text prompt
    learning"): prompt = ``[SOS] ctx_1 … ctx_n <class-name tokens> <template suffix> [EOS]``, encoded by the
    frozen text tower with gradients reaching only ``ctx``.

    Args:
        teacher: the CLIP teacher (read at construction for token embeddings; not stored).
        context_init: ``template`` (default: ``ctx`` = the token embeddings of the words before ``{}`` in the
            teacher's first template, e.g. "a photo of a", so the untrained learner gives exactly the
            teacher's text embeddings of that template), ``random`` (``context_length`` tokens, normal, std
            0.02, CoOp / the public code) or ``file`` (a saved context: DeOP initialises from an offline-learnt
            one, as SimBaseline).
        context_length: tokens of context for ``random`` (the public recipe: 16).
        context_file: ``(n, width)`` context for ``file``: a tensor file, or a state dict whose entry is named
            ``context`` or ends in ``prefix_prompt`` (zsseg / DeOP's prompt checkpoints).
    """

    def __init__(
        self,
        teacher,
        context_init: ContextInit = "template",
        context_length: int = 16,
        context_file: Optional[str] = None,
    ) -> None:
        super().__init__()
        if context_init not in CONTEXT_INITS:
            raise ValueError(f"method.text_prompts.context_init={context_init!r} is not one of {list(CONTEXT_INITS)}")
        tokenizer = teacher.tokenizer
        if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "sot_token_id"):
            raise ValueError(f"text prompt learning needs CLIP's BPE tokenizer; teacher {teacher.arch!r} has {type(tokenizer).__name__}")
        template = teacher.templates[0]
        prefix_text, suffix_text = template.split("{}")
        self.suffix_ids: list[int] = tokenizer.encode(suffix_text.strip()) if suffix_text.strip() else []
        token_embedding = teacher.model.token_embedding
        width = token_embedding.weight.shape[1]
        if context_init == "template":
            prefix_ids = tokenizer.encode(prefix_text.strip()) if prefix_text.strip() else []
            if not prefix_ids:
                raise ValueError(f"method.text_prompts.context_init=template: template {template!r} has no words before '{{}}'")
            with torch.no_grad():
                context = token_embedding.weight[torch.tensor(prefix_ids)].detach().clone().float()
        elif context_init == "random":
            if context_length < 1:
                raise ValueError(f"method.text_prompts.context_length={context_length!r}: expected at least 1")
            context = torch.randn(context_length, width) * 0.02
        else:
            context = self._read_context(context_file, width)
        self.context = nn.Parameter(context)
        self.context_length_limit = int(teacher.model.context_length)
        self._tokenizer = tokenizer

    @staticmethod
    def _read_context(path: Optional[str], width: int) -> Tensor:
        if not path:
            raise ValueError("method.text_prompts.context_init=file needs method.text_prompts.context_file=<path>")
        if not Path(path).is_file():
            raise ValueError(f"method.text_prompts.context_file={path!r} does not exist")
        loaded = torch.load(path, map_location="cpu", weights_only=True) if Path(path).suffix in (".pt", ".pth") else None
        if not isinstance(loaded, Tensor):
            state = read_weight_file(path, key="method.text_prompts.context_file") if loaded is None else loaded
            state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
            names = [name for name in state if name == "context" or name.endswith("prefix_prompt")]
            if len(names) != 1:
                raise ValueError(
                    f"method.text_prompts.context_file={path!r}: expected one tensor named 'context' or '*prefix_prompt', "
                    f"found {names or 'none'} among {len(state)} entries"
                )
            loaded = state[names[0]]
        if loaded.dim() != 2 or loaded.shape[1] != width:
            raise ValueError(f"method.text_prompts.context_file={path!r}: context {tuple(loaded.shape)} is not (n, {width})")
        return loaded.detach().float().clone()

    def _token_ids(self, class_names: Sequence[str], device) -> Tensor:
        tokenizer, count = self._tokenizer, self.context.shape[0]
        rows = []
        for name in class_names:
            ids = [tokenizer.sot_token_id] + [0] * count + tokenizer.encode(name) + self.suffix_ids + [tokenizer.eot_token_id]
            if len(ids) > self.context_length_limit:
                raise ValueError(
                    f"text prompt for class {name!r} needs {len(ids)} tokens with {count} context tokens; "
                    f"the teacher's context length is {self.context_length_limit}"
                )
            rows.append(ids + [0] * (self.context_length_limit - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=device)

    def forward(self, teacher, class_names: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(len(class_names), D)`` with the learnt context; differentiable
        in ``context`` (the teacher's weights stay frozen)."""
        model = teacher.model
        ids = self._token_ids(class_names, self.context.device)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast_dtype)
        count = self.context.shape[0]
        x = torch.cat([x[:, :1], self.context.to(cast_dtype).expand(len(class_names), -1, -1), x[:, 1 + count :]], dim=1)
        x = x + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        if model.text_pool_type != "argmax":
            raise ValueError(f"text prompt learning supports CLIP's argmax (EOT) pooling, not {model.text_pool_type!r}")
        pooled = x[torch.arange(len(class_names), device=x.device), ids.argmax(dim=-1)]
        projection = model.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return F.normalize(pooled.float(), dim=-1)
