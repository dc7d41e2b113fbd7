"""MAFT (method=maft): IP-CLIP's attention bias (Eq. 2) and its one pass (Eqs. 3–4) against a hand-written masked
ViT; patch tokens independent of the masks; all-ones masks vs the ordinary CLS; L scaled with depth; arbitrary N
and input size; S_IoU (Eq. 5 input) against loops, min-max normalisation, each L_ma variant, L_dis and the ensemble
of Eq. 9 by hand; frozen units and the frozen teacher bitwise unchanged after optimiser steps; the export loaded as
a teacher; stage 1 → stage 2 → eval through the CLI; every ablation sweep composes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from zeroseg.build import build_run
from zeroseg.clip import CLIPTeacher
from zeroseg.methods.maft import (
    distillation_loss,
    ensemble_scores,
    mask_aware_loss,
    min_max_normalise,
    proposal_class_iou,
)
from zeroseg.models.ip_clip import IPCLIP, resolve_from_layer

from conftest import TINY_OVERRIDES, compose_sweep_jobs, subprocess_env
from test_region_tokens import plain_block

# a 3-block CLS-pooled tower: every from_layer (0, 1, 2) has blocks before and after it
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
QUERY = [
    "method.segmenter.dim=32",
    "method.segmenter.conv_dim=32",
    "method.segmenter.mask_dim=32",
    "method.segmenter.ffn_dim=64",
    "method.segmenter.encoder_ffn_dim=64",
    "method.segmenter.num_queries=6",
    "method.matcher.num_points=128",
    "method.criterion.num_points=128",
    "method.input_scale=1.0",
]
TINY = [o for o in TINY_OVERRIDES if not o.startswith(("method", "dataset.train_dataset.scene.image_size"))]
TINY += ["dataset.train_dataset.scene.image_size=64", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def teacher() -> CLIPTeacher:
    return CLIPTeacher(arch="tiny3", random_init=True, random_init_seed=3, model_cfg=CLIP_CFG)


def _pixels(height: int = 32, width: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _random_masks(batch: int, regions: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, regions, height, width, generator=torch.Generator().manual_seed(seed))


# -- a hand-written masked ViT (independent of region_tokens) ---------------------------------------------------------


# one pre-norm CLIP block with masked attention written out by hand (shared with the region-token tests)
hand_block = plain_block


def hand_tokens(visual, pixels: torch.Tensor) -> torch.Tensor:
    """Patch embedding + CLS + position embedding (grid equal to the pretraining grid: no interpolation) + ln_pre."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)


def grid_masks_by_loops(masks: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Each proposal's token mask: the mean of the mask over a patch's pixels ≥ threshold (numpy loops)."""
    array = masks.numpy()
    batch, regions, height, width = array.shape
    ph, pw = height // grid[0], width // grid[1]
    out = np.zeros((batch, regions, grid[0] * grid[1]), dtype=bool)
    for b in range(batch):
        for r in range(regions):
            for i in range(grid[0]):
                for j in range(grid[1]):
                    out[b, r, i * grid[1] + j] = array[b, r, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].mean() >= threshold
    return out


def expected_allowed(token_masks: np.ndarray) -> np.ndarray:
    """Eq. 2's M̂ = [I(N, N); Flat(M)] for the CLS rows and patches → patches only (Eq. 4), built by loops."""
    batch, regions, patches = token_masks.shape
    size = regions + patches
    allowed = np.zeros((batch, size, size), dtype=bool)
    for b in range(batch):
        for n in range(regions):
            allowed[b, n, n] = True
            for p in range(patches):
                allowed[b, n, regions + p] = token_masks[b, n, p]
        for p in range(patches):
            for q in range(patches):
                allowed[b, regions + p, regions + q] = True
    return allowed


def hand_ip_clip(visual, pixels: torch.Tensor, token_masks: np.ndarray, start: int) -> torch.Tensor:
    x = hand_tokens(visual, pixels)
    for block in visual.transformer.resblocks[:start]:
        x = hand_block(block, x, torch.ones(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool))
    regions = token_masks.shape[1]
    sequence = torch.cat([x[:, :1].repeat(1, regions, 1), x[:, 1:]], dim=1)
    allowed = torch.from_numpy(expected_allowed(token_masks))
    for block in visual.transformer.resblocks[start:]:
        sequence = hand_block(block, sequence, allowed)
    return visual.ln_post(sequence[:, :regions]) @ visual.proj


# -- IP-CLIP ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 1, 2])
def test_attention_bias_lets_each_copy_see_exactly_itself_and_its_mask_patches(teacher, start: int) -> None:
    ip_clip = IPCLIP(teacher.model.visual, from_layer=start, reference_depth=None)
    pixels, masks = _pixels(), _random_masks(2, 5, 32, 32)
    masks[0, 3] = 0.0  # an empty proposal: its copy sees only itself
    masks[1, 4] = 1.0  # a full one
    captured = []
    hooks = [
        block.register_forward_pre_hook(lambda module, args, kwargs: captured.append(kwargs.get("attn_mask")), with_kwargs=True)
        for block in ip_clip.visual.transformer.resblocks
    ]
    with torch.no_grad():
        result = ip_clip(pixels, masks)
    for hook in hooks:
        hook.remove()
    token_masks = grid_masks_by_loops(masks, (4, 4))
    allowed = expected_allowed(token_masks)
    heads = ip_clip.visual.transformer.resblocks[0].attn.num_heads
    assert all(bias is None for bias in captured[:start]) and len(captured) == 3
    for bias in captured[start:]:  # Eq. 2: 0 where allowed, -inf elsewhere, the same for every head
        bias = bias.view(2, heads, 21, 21)
        for h in range(heads):
            assert np.array_equal(bias[:, h].numpy() == 0, allowed)
            assert np.all(np.isneginf(bias[:, h].numpy()[~allowed]))
    with torch.no_grad():
        expected = hand_ip_clip(ip_clip.visual, pixels, token_masks, start)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)


def test_patch_tokens_are_unaffected_by_the_masks(teacher) -> None:
    start = 1
    ip_clip = IPCLIP(teacher.model.visual, from_layer=start, reference_depth=None)
    pixels = _pixels()

    def patch_outputs(masks: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        hooks = [
            block.register_forward_hook(lambda module, args, output: outputs.append(output[:, -16:].clone()))
            for block in ip_clip.visual.transformer.resblocks
        ]
        with torch.no_grad():
            ip_clip(pixels, masks)
        for hook in hooks:
            hook.remove()
        return outputs

    first, second = patch_outputs(_random_masks(2, 3, 32, 32, seed=5)), patch_outputs(_random_masks(2, 7, 16, 16, seed=6))
    for a, b in zip(first, second):  # other proposals, another N: the same patch tokens (up to float summation order)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        # before L: the unmodified teacher's patch tokens; from L on (Eq. 4): patches attending to patches only
        x = hand_tokens(teacher.model.visual, pixels)
        for index, block in enumerate(teacher.model.visual.transformer.resblocks):
            if index < start:
                x = hand_block(block, x, torch.ones(2, 17, 17, dtype=torch.bool))
                torch.testing.assert_close(first[index], x[:, 1:], rtol=1e-5, atol=1e-5)
            else:
                patches = x[:, 1:] if index == start else patches  # noqa: F821 - defined at index == start
                patches = hand_block(block, patches, torch.ones(2, 16, 16, dtype=torch.bool))
                torch.testing.assert_close(first[index], patches, rtol=1e-4, atol=1e-5)


def test_all_ones_masks_give_the_ordinary_cls_token(teacher) -> None:
    pixels = _pixels()
    ones = torch.ones(2, 4, 32, 32)
    visual = teacher.model.visual
    with torch.no_grad():
        # L = the last block: the patches entering it are the teacher's, so every copy is the teacher's own CLS
        last = IPCLIP(visual, from_layer=2, reference_depth=None)(pixels, ones)
        ordinary = teacher.encode_image(pixels * teacher.pixel_std + teacher.pixel_mean)[0]
        x = hand_tokens(visual, pixels)
        for block in visual.transformer.resblocks:
            x = hand_block(block, x, torch.ones(2, 17, 17, dtype=torch.bool))
        by_hand = visual.ln_post(x[:, 0]) @ visual.proj
        torch.testing.assert_close(ordinary, by_hand, rtol=1e-4, atol=1e-5)
        for n in range(4):
            torch.testing.assert_close(last[:, n], by_hand, rtol=1e-4, atol=1e-5)
        # L = 0: each copy is the CLS of a pass in which the patches never see the CLS (Eq. 4)
        first = IPCLIP(visual, from_layer=0, reference_depth=None)(pixels, ones)
        allowed = torch.ones(2, 17, 17, dtype=torch.bool)
        allowed[:, 1:, 0] = False
        x = hand_tokens(visual, pixels)
        for block in visual.transformer.resblocks:
            x = hand_block(block, x, allowed)
        for n in range(4):
            torch.testing.assert_close(first[:, n], visual.ln_post(x[:, 0]) @ visual.proj, rtol=1e-4, atol=1e-5)
        # without masks (Eq. 8's student): the ordinary CLS of the copy, = the teacher's before any training
        student = IPCLIP(visual, from_layer=1, reference_depth=None).encode_without_masks(pixels)
        torch.testing.assert_close(student, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("regions,height,width", [(1, 32, 32), (5, 40, 56), (9, 24, 48)])
def test_any_number_of_proposals_and_any_input_size(teacher, regions: int, height: int, width: int) -> None:
    ip_clip = IPCLIP(teacher.model.visual, from_layer=1, reference_depth=None)
    pixels = _pixels(height, width, batch=1, seed=regions)
    masks = _random_masks(1, regions, height, width, seed=regions + 1)
    with torch.no_grad():
        result = ip_clip(pixels, masks)
        grid = (height // 8, width // 8)
        visual = ip_clip.visual
        # hand version with the position embedding bicubically resized to the grid (as CLIP at other sizes)
        position = visual.positional_embedding
        patch_position = position[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        patch_position = F.interpolate(patch_position, size=grid, mode="bicubic", align_corners=False)
        position = torch.cat([position[:1], patch_position.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = visual.ln_pre(torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1) + position)
        size = x.shape[1]
        x = hand_block(visual.transformer.resblocks[0], x, torch.ones(1, size, size, dtype=torch.bool))
        token_masks = grid_masks_by_loops(masks, grid)
        sequence = torch.cat([x[:, :1].repeat(1, regions, 1), x[:, 1:]], dim=1)
        allowed = torch.from_numpy(expected_allowed(token_masks))
        for block in visual.transformer.resblocks[1:]:
            sequence = hand_block(block, sequence, allowed)
        expected = visual.ln_post(sequence[:, :regions]) @ visual.proj
    assert result.shape == (1, regions, 32)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)


def test_start_layer_scales_with_depth_and_bad_values_name_the_key() -> None:
    assert [resolve_from_layer(8, depth) for depth in (12, 24, 4, 6)] == [8, 16, 3, 4]
    assert [resolve_from_layer(layer, 4) for layer in (0, 2, 4, 6, 8, 10)] == [0, 1, 1, 2, 3, 3]
    assert resolve_from_layer(2, 4, None) == 2
    with pytest.raises(ValueError, match="method.ip_clip.from_layer"):
        resolve_from_layer(12, 12)
    with pytest.raises(ValueError, match="method.ip_clip.from_layer"):
        resolve_from_layer(-1, 12)


def test_frozen_units_name_their_parameters_and_unknown_units_fail(teacher) -> None:
    ip_clip = IPCLIP(teacher.model.visual, frozen_units=["conv", "cls", "pos", "mlp", "proj", "ln_pre"])
    frozen = {name for name, p in ip_clip.visual.named_parameters() if not p.requires_grad}
    expected = {"conv1.weight", "class_embedding", "positional_embedding", "proj", "ln_pre.weight", "ln_pre.bias"}
    expected |= {
        f"transformer.resblocks.{i}.mlp.{layer}.{k}" for i in range(3) for layer in ("c_fc", "c_proj") for k in ("weight", "bias")
    }
    assert frozen == expected
    assert all(p.requires_grad for p in IPCLIP(teacher.model.visual, frozen_units=[]).visual.parameters())
    assert not any(p.requires_grad for p in teacher.model.visual.parameters())  # the teacher stays frozen
    with pytest.raises(ValueError, match=r"frozen_units has unknown unit\(s\) \['bias'\]"):
        IPCLIP(teacher.model.visual, frozen_units=["conv", "bias"])


# -- losses (Sec. 4.2) and the ensemble (Eq. 9) by hand -----------------------------------------------------------------


def test_proposal_class_iou_equals_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 8, generator=generator) * 3
    labels = torch.randint(0, 3, (2, 6, 8), generator=generator)
    labels[0, :2] = 255
    labels[1][labels[1] == 1] = 0  # image 1 has no class 1
    for mode in ("soft", "binary"):
        for ignore in ("include", "exclude"):
            iou, image_index, class_id = proposal_class_iou(logits, labels, 255, mode, ignore)
            expected_rows = [(b, c) for b in range(2) for c in range(3) if (labels[b] == c).any()]
            assert list(zip(image_index.tolist(), class_id.tolist())) == expected_rows
            probability = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
            if mode == "binary":
                probability = (probability >= 0.5).astype(np.float64)
            for row, (b, c) in enumerate(expected_rows):
                target = labels[b].numpy() == c
                keep = labels[b].numpy() != 255 if ignore == "exclude" else np.ones_like(target)
                for n in range(3):
                    p = probability[b, n] * keep
                    inter = (p * target).sum()
                    assert math.isclose(float(iou[row, n]), inter / (p.sum() + target.sum() - inter), rel_tol=1e-5)


def test_min_max_normalisation_by_hand() -> None:
    iou = torch.tensor([[0.2, 0.8, 0.5, 0.2], [0.9, 0.3, 0.3, 0.6]])
    expected = [[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.5]]
    torch.testing.assert_close(min_max_normalise(iou), torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(min_max_normalise(torch.full((1, 3), 0.4)), torch.zeros(1, 3))  # constant row: zeros, no NaN


def test_each_mask_aware_loss_and_the_distillation_loss_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.25]])
    target = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    d = (scores - target).numpy()
    smooth = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5).mean()
    assert math.isclose(float(mask_aware_loss(scores, target, "smooth_l1")), smooth, rel_tol=1e-6)
    assert math.isclose(float(mask_aware_loss(scores, target, "l1")), np.abs(d).mean(), rel_tol=1e-6)
    assert math.isclose(float(mask_aware_loss(scores, target, "l2")), (d**2).mean(), rel_tol=1e-6)
    kl = 0.0
    for s_row, t_row in zip(scores.numpy(), target.numpy()):
        p, q = t_row / t_row.sum(), s_row / s_row.sum()
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    assert math.isclose(float(mask_aware_loss(scores, target, "kl")), kl / 2, rel_tol=1e-4)
    # SmoothL1's linear branch (|x - y| >= 1, Eq. 7)
    assert math.isclose(float(mask_aware_loss(torch.tensor([[2.5]]), torch.tensor([[0.0]]))), 2.0, rel_tol=1e-6)
    student, teacher_scores = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.5, 0.5, 0.0]])
    e = (student - teacher_scores).numpy()
    assert math.isclose(float(distillation_loss(student, teacher_scores)), (0.5 * e**2).mean(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="method.mask_aware_loss='huber'"):
        mask_aware_loss(scores, target, "huber")
    empty = torch.zeros(0, 3, requires_grad=True)
    assert float(mask_aware_loss(empty, torch.zeros(0, 3)).detach()) == 0.0


def test_ensemble_of_eq9_by_hand() -> None:
    proposal = torch.tensor([[[0.6, 0.3, 0.1]]])
    clip = torch.tensor([[[0.2, 0.5, 0.3]]])
    seen = torch.tensor([True, False, True])
    lam = 0.7
    eq9 = [0.6**lam * 0.2 ** (1 - lam), 0.5**lam, 0.1**lam * 0.3 ** (1 - lam)]
    torch.testing.assert_close(ensemble_scores(proposal, clip, seen, lam, "eq9")[0, 0], torch.tensor(eq9))
    public = [eq9[0], 0.3 ** (1 - lam) * 0.5**lam, eq9[2]]
    torch.testing.assert_close(ensemble_scores(proposal, clip, seen, lam, "public")[0, 0], torch.tensor(public))
    assert torch.equal(ensemble_scores(proposal, clip, seen, lam, "none"), clip)


# -- the method: stage 1 checkpoint, training steps, inference, export ----------------------------------------------------


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory) -> Path:
    """A tiny stage-1 run (method=query_baseline, 2 steps) through train()."""
    from zeroseg.train import train

    from conftest import compose_test_config

    root = tmp_path_factory.mktemp("stage1")
    cfg = compose_test_config(root, [*TINY, "method=query_baseline", *QUERY, "test=false"], tiny=False)
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def _maft_cfg(make_cfg, stage1: Path, *extra: str):
    return make_cfg([*TINY, "method=maft", f"method.proposals.ckpt_path={stage1}", *extra], tiny=False)


@pytest.mark.parametrize("units", [["conv", "cls", "pos", "mlp"], ["conv", "cls", "pos", "mlp", "proj", "ln_pre"]])
def test_frozen_units_and_the_teacher_stay_bitwise_unchanged_after_steps(make_cfg, stage1_checkpoint, units) -> None:
    cfg = _maft_cfg(make_cfg, stage1_checkpoint, f"method.ip_clip.frozen_units=[{','.join(units)}]", "method.optimizer.lr=1e-2")
    objects = build_run(cfg, with_callbacks=False)
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    proposals_before = {k: v.clone() for k, v in model.proposals.state_dict().items()}
    tower_before = {k: v.clone() for k, v in model.ip_clip.visual.named_parameters()}
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    model.train()
    loader = iter(datamodule.train_dataloader())
    for _ in range(2):
        losses = model.training_losses(next(loader))
        assert set(losses) == {"mask_aware", "distillation", "loss"} and all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert all(torch.equal(v, proposals_before[k]) for k, v in model.proposals.state_dict().items())
    assert not model.proposals.training and not model.teacher.training
    frozen = set(model.ip_clip.frozen_names)
    for name, parameter in model.ip_clip.visual.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, tower_before[name]), name
        elif name.startswith("transformer.resblocks.2.attn"):  # a mask-aware block's attention learns
            assert not torch.equal(parameter, tower_before[name]), name


def test_predict_logits_is_the_ensemble_times_the_masks_and_the_export_loads_as_a_teacher(
    make_cfg, stage1_checkpoint, tmp_path
) -> None:
    cfg = _maft_cfg(make_cfg, stage1_checkpoint)
    model = build_run(cfg, with_callbacks=False)["model"].eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.predict_logits(images, model.class_text_embeddings)
        final = model.proposals(images, model.class_text_embeddings)[-1]
        proposal_scores = final.class_logits.softmax(-1)[..., :-1].numpy()
        regions = model.ip_clip(model.teacher.normalize(images), final.mask_logits.sigmoid())
        cosine = (F.normalize(regions, dim=-1) @ F.normalize(model.class_text_embeddings, dim=-1).t()).numpy()
    clip_scores = np.exp(cosine / model.temperature)
    clip_scores /= clip_scores.sum(-1, keepdims=True)
    unseen = set(model.unseen_class_ids)
    combined = np.empty_like(clip_scores)
    for c in range(clip_scores.shape[-1]):
        if c in unseen:
            combined[..., c] = clip_scores[..., c] ** 0.7
        else:
            combined[..., c] = proposal_scores[..., c] ** 0.7 * clip_scores[..., c] ** 0.3
    masks = torch.sigmoid(F.interpolate(final.mask_logits, size=(64, 64), mode="bilinear", align_corners=False)).numpy()
    expected = np.einsum("bnc,bnhw->bchw", combined, masks)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-5)
    # the export: IP-CLIP's tower + the teacher's text tower, loadable as a teacher
    with torch.no_grad():
        for parameter in model.ip_clip.visual.transformer.resblocks[-1].attn.parameters():
            parameter.add_(0.01)
    path = model.export_ip_clip(tmp_path / "ip_clip.safetensors")
    loaded = CLIPTeacher(arch="toy", pretrained=str(path), model_cfg=OmegaConf.to_container(cfg.clip.model_cfg))
    for name, tensor in loaded.model.state_dict().items():
        source = (
            model.ip_clip.visual.state_dict()[name[len("visual.") :]]
            if name.startswith("visual.")
            else model.teacher.model.state_dict()[name]
        )
        assert torch.equal(tensor, source), name


def test_a_missing_or_wrong_stage1_checkpoint_names_the_run_that_produces_it(make_cfg, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"method.proposals.ckpt_path is not set.*method=query_baseline"):
        build_run(make_cfg([*TINY, "method=maft"], tiny=False), with_callbacks=False)
    with pytest.raises(FileNotFoundError, match=r"method.proposals.ckpt_path=.*nope.ckpt.*method=query_baseline"):
        build_run(
            make_cfg([*TINY, "method=maft", f"method.proposals.ckpt_path={tmp_path / 'nope.ckpt'}"], tiny=False),
            with_callbacks=False,
        )


def test_the_stage1_command_names_the_dataset_recipe(stage1_checkpoint, make_cfg) -> None:
    model = build_run(_maft_cfg(make_cfg, stage1_checkpoint), with_callbacks=False)["model"]
    assert "method=query_baseline" in model._stage1_command()  # the toy world: stage 1 is query_baseline
    for dataset in ("voc", "coco_stuff"):  # the real benchmarks: their stage-1 recipe
        model.split = SimpleNamespace(name=dataset)
        assert f"experiment=maft_stage1_{dataset}" in model._stage1_command()


@pytest.mark.slow
def test_stage1_then_stage2_then_eval_through_the_cli(tmp_path) -> None:
    env = subprocess_env()
    env["ZEROSEG_CACHE_DIR"] = str(tmp_path / "cache")
    common = [o for o in TINY if not o.startswith("callbacks")]

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", module, *common, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("zeroseg.train", "callbacks=minimal", "method=query_baseline", *QUERY, "test=false")
    (stage1,) = (tmp_path / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    run("zeroseg.train", "callbacks=minimal", "method=maft", f"method.proposals.ckpt_path={stage1}")
    (stage2,) = [p for p in (tmp_path / "logs" / "train" / "runs").glob("*/ip_clip.safetensors")]
    metrics = json.loads((stage2.parent / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and 0 <= metrics["hIoU"] <= 100
    evaluated = run(
        "zeroseg.eval",
        "method=maft",
        f"method.proposals.ckpt_path={stage1}",
        f"ckpt_path={stage2.parent / 'checkpoints' / 'last.ckpt'}",
    )
    assert "hIoU" in evaluated.stdout
    # the fine-tuned CLIP as the teacher of another method
    run("zeroseg.eval", "method=clip_zero_shot", f"clip.pretrained={stage2}")


# -- configs ------------------------------------------------------------------------------------------------------------


SWEEPS = {  # experiment -> (paper table, jobs)
    "maft_ablation_loss": ("Table 4b", 4),
    "maft_ablation_iters": ("Table 4c", 6),
    "maft_ablation_frozen": ("Table 4d", 6),
    "maft_ablation_start_layer": ("Table 4e", 6),
}


@pytest.mark.parametrize("experiment", sorted(SWEEPS))
def test_each_ablation_sweep_composes_in_the_paper_setting_and_on_the_toy_proxy(experiment: str) -> None:
    title, count = SWEEPS[experiment]
    jobs = compose_sweep_jobs(experiment)  # checks each swept value in the composed config
    assert len(jobs) == count
    labels = {"".join(k.split()).lower(): v for k, v in jobs[0][1].sweep_table.rows.items()}
    assert title in jobs[0][1].sweep_table.title and len(labels) == count
    for overrides, cfg in jobs:
        assert cfg.method._target_ == "zeroseg.methods.MAFT" and cfg.method.ensemble == "none"
        assert cfg.dataset.split.benchmark == "coco_stuff" and cfg.clip.arch == "ViT-B-16"
        assert cfg.method.clip_input_size == 480 and cfg.method.optimizer.lr == 1.0e-5 and cfg.dataset.batch_size == 16
        if experiment != "maft_ablation_iters":
            assert cfg.trainer.max_steps == 1000
        # list values come back from the parser quoted ([cls] -> ['cls']); Hydra's overrides.yaml keeps [cls]
        assert "".join(", ".join(overrides).split()).lower().replace("'", "") in labels
    for _, cfg in compose_sweep_jobs(experiment, extra=("+world=toy",)):
        assert cfg.clip.arch == "toy" and cfg.method.clip_input_size is None and "toy_proxy" in cfg.tags


def test_components_sweep_rows_and_the_recipes_compose(make_cfg) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        rows = {}
        for row in ("ip_clip", "ft_ma", "ft_ma_dis"):
            rows[row] = compose("train", overrides=["experiment=maft_ablation_components", f"+experiment/maft_table_4a={row}"])
        stage1 = compose("train", overrides=["experiment=maft_stage1_coco_stuff"])
        recipes = {ds: compose("train", overrides=[f"experiment=maft_{ds}"]) for ds in ("voc", "coco_stuff")}
    GlobalHydra.instance().clear()
    assert rows["ip_clip"].train is False
    assert rows["ft_ma"].method.distillation_weight == 0 and rows["ft_ma_dis"].method.distillation_weight == 1
    assert stage1.method._target_ == "zeroseg.methods.QueryBaseline" and stage1.backbone.model_name == "resnet101c"
    assert stage1.method.segmenter.num_queries == 100 and stage1.trainer.max_steps == 60000
    assert recipes["voc"].trainer.max_steps == 100 and recipes["coco_stuff"].trainer.max_steps == 1000
    for cfg in recipes.values():
        assert cfg.method.clip_input_size == 480 and cfg.method.optimizer.lr == 1e-5 and cfg.method.optimizer.weight_decay == 1e-5
        assert cfg.dataset.batch_size == 16 and cfg.method.ip_clip.from_layer == 8
