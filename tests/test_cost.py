"""The cost benchmark (zeroseg/cost.py): its FLOP counter against hand counts, its split by part against a
model built here, and a cost row for every registered method on a tiny configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_OVERRIDES
from zeroseg.cost import _count_flops, flop_counter, format_markdown, measure_row
from zeroseg.toy.benchmark import load_benchmark_config, registered_methods


def _flops(module: nn.Module, x: torch.Tensor, backward: bool) -> int:
    with flop_counter() as counter:
        out = module(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def test_linear_flops_equal_the_hand_count() -> None:
    linear = nn.Linear(7, 5)
    x = torch.randn(3, 7, requires_grad=True)
    forward = 2 * 3 * 7 * 5  # a multiply-add counts 2; the bias add is not counted
    assert _flops(linear, x, backward=False) == forward
    assert _flops(linear, x, backward=True) == 3 * forward  # + input gradient + weight gradient


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_flops_equal_the_hand_count_grouped_backward_included(groups: int) -> None:
    conv = nn.Conv2d(8, 6 * groups if groups > 1 else 6, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    out_channels = conv.out_channels
    forward = 2 * 2 * out_channels * (8 // groups) * 9 * 10 * 10
    assert _flops(conv, x, backward=False) == forward
    # each of the two gradients costs one forward (torch's own formula counts the grouped one `groups` times)
    assert _flops(conv, x, backward=True) == 3 * forward
    x_frozen = torch.randn(2, 8, 10, 10)  # no input gradient: only the weight gradient
    assert _flops(conv, x_frozen, backward=True) == 2 * forward


class _Prompt(nn.Module):
    """A learnable prompt that runs a tower it is given inside its own call (DeOP's text prompts run the
    teacher's text tower)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, tower: nn.Module) -> torch.Tensor:
        return tower(self.linear(x))


class _Method(nn.Module):
    """A method-shaped model: a frozen teacher, a backbone, a head, and a matmul outside any module."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Module()
        self.teacher.blocks = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6)).requires_grad_(False)
        self.teacher.encode = lambda x: self.teacher.blocks(x)
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.prompts = _Prompt()

    def training_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher.encode(x)  # like CLIPTeacher.encode_image: the child itself is never called
        prompted = self.prompts(x, self.teacher.blocks)  # the tower's FLOPs: the teacher's, counted once
        features = self.backbone(x + prompted[:, :4])
        outside = features @ features.t()  # (5, 5): 2*5*8*5 FLOPs outside modules
        return {"loss": self.head(features).sum() + outside.sum() + target.sum()}


def test_flops_are_split_into_teacher_backbone_modules_outside_and_backward() -> None:
    x = torch.randn(5, 4)
    split = _count_flops(_Method(), "training_losses", x, backward=True)
    tower = 2 * 5 * 4 * 6 + 2 * 5 * 6 * 6
    assert split["teacher"] == 2 * tower  # the direct pass and the one inside the prompt's call
    assert split["backbone"] == 2 * 5 * 4 * 8
    assert split["modules"] == 2 * 5 * 8 * 3 + 2 * 5 * 4 * 4  # head + the prompt's own linear
    assert split["outside"] == 2 * 5 * 8 * 5
    # backward: head (input + weight grads), the outside matmul (two operand grads), backbone (input + weight:
    # its input depends on the prompt), the tower inside the prompt (input grads only: frozen), the prompt (weight)
    assert split["backward"] == (
        2 * (2 * 5 * 8 * 3) + 2 * (2 * 5 * 8 * 5) + 2 * (2 * 5 * 4 * 8) + tower + 2 * 5 * 4 * 4
    )
    # every operation in exactly one part
    assert split["total"] == sum(split[k] for k in ("teacher", "backbone", "modules", "outside", "backward"))


def _tiny(method: str) -> tuple[list[str], list[str] | None]:
    """A tiny configuration of ``method`` (its own tests' sizes) and, for two-stage methods, its first stage."""
    import test_deop
    import test_multipass_clip
    import test_proposals
    import test_split_matching

    base = [o for o in TINY_OVERRIDES if not o.startswith(("method", "trainer", "dataset"))]
    tiny = {
        "baseline": ["method=baseline", "method.head.width=32"],
        "clip_zero_shot": ["method=clip_zero_shot"],
        "c2s": ["method=c2s", "method.head.width=32", "method.decoder_heads=4", "method.pseudo_masks.window_sizes=[1,3]"],
        "chimera": ["method=chimera", "method.pseudo_masks.window_sizes=[1,3]", "method.head.width=32"],
        "query_baseline": [o for o in test_proposals.QUERY_TINY if o.startswith("method")],
        "split_matching": [o for o in test_split_matching.TINY if o.startswith("method")],
        "deop": [o for o in test_deop.TINY if o.startswith(("method", "clip"))],
        "multipass_clip": [o for o in test_multipass_clip.TINY if o.startswith(("method", "clip"))],
    }
    if method == "maft":  # stage 2 on a random-weight stage-1 query model
        import test_maft

        return [*base, "method=maft"], [*base, "method=query_baseline", *test_maft.QUERY]
    return [*base, *tiny[method]], None


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_every_method_gets_a_cost_row(method: str) -> None:
    overrides, stage1 = _tiny(method)
    row = measure_row(overrides, train_batch=2, image_size=64, repeats=1, device="cpu", gpu_batch=2, stage1_overrides=stage1)
    for key in ("trainable_params", "frozen_params", "checkpoint_params", "cpu_inference_seconds", "cpu_peak_rss_mb"):
        assert row[key] >= 0, key
    trains = method != "clip_zero_shot"
    assert (row["cpu_train_step_seconds"] is not None) == trains and (row["train_flops_per_image"] is not None) == trains
    assert row["gpu_train_step_seconds"] is None  # never estimated without a GPU
    assert row["inference_flops_per_image"]["total"] > 0
    if method in ("c2s", "chimera"):  # distilled: the teacher never runs at inference
        assert row["inference_flops_per_image"]["teacher"] == 0 and row["train_flops_per_image"]["teacher"] > 0
    markdown = format_markdown({"name": "cost", "settings": {"image_size": 32, "train_batch": 2, "threads": 1, "repeats": 1, "gpu_batch": 2}, "rows": [{"row": method, **row}]})
    assert f"| {method} |" in markdown


def test_the_cost_table_has_a_row_for_every_registered_method() -> None:
    rows = load_benchmark_config("cost", []).rows
    assert set(registered_methods()) <= {row.method for row in rows}
    for row in rows:  # and each row builds the method it names
        assert f"method={row.method}" in row.overrides or any(o.startswith(f"experiment={row.method}_") for o in row.overrides), row.row
