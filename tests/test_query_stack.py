"""The query-based mask-classification stack: matcher vs brute force and hand costs, grouped matching,
non-finite costs, criterion by hand and deep supervision, masked attention, deformable attention
vs a loop reference, semantic inference, class-agnostic modes, gradients, and method=query_baseline."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.models.query_segmenter import QuerySegmenter
from zeroseg.models.deformable_attention import multi_scale_deformable_attention
from zeroseg.models.query_decoders import QueryPrediction, attention_mask_from_masks
from zeroseg.toolkit.matching import (
    HungarianMatcher,
    NonFiniteCostError,
    SetCriterion,
    Targets,
    semantic_inference,
    targets_from_labels,
)

QUERY = ["method=query_baseline"]


def _random_problem(seed: int, queries: int = 5, targets: int = 3, classes: int = 4, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, queries, classes + 1, generator=generator)
    mask_logits = torch.randn(1, queries, size, size, generator=generator) * 3
    target_masks = (torch.rand(targets, size, size, generator=generator) > 0.5).float()
    target_classes = torch.randint(0, classes, (targets,), generator=generator)
    return class_logits, mask_logits, Targets([target_classes], [target_masks])


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force(seed: int) -> None:
    class_logits, mask_logits, targets = _random_problem(seed)
    matcher = HungarianMatcher(num_points=64)
    torch.manual_seed(seed)
    terms = matcher.cost_terms(class_logits, mask_logits, targets)
    cost = (2 * terms["class"] + 5 * terms["mask"] + 5 * terms["dice"])[0, :, :3]
    torch.manual_seed(seed)  # the same sampled points
    rows, cols = matcher(class_logits, mask_logits, targets)[0]
    best = min(sum(float(cost[q, t]) for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)
    assert sorted(cols.tolist()) == [0, 1, 2] and len(set(rows.tolist())) == 3


def test_each_cost_term_by_hand() -> None:
    # constant masks make every sampled point equal (border padding: also within half a pixel of the
    # edge): the costs are closed forms
    class_logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])  # 2 queries, K=2 + no object
    mask_logits = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous()
    targets = Targets([torch.tensor([0, 1])], [torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])])
    terms = HungarianMatcher(num_points=16, padding_mode="border").cost_terms(class_logits, mask_logits, targets)
    probs = class_logits[0].softmax(-1)
    torch.testing.assert_close(terms["class"][0], -probs[:, :2])
    x = torch.tensor([2.0, -1.0])
    bce_to_one, bce_to_zero = F.softplus(-x), F.softplus(x)
    torch.testing.assert_close(terms["mask"][0], torch.stack([bce_to_one, bce_to_zero], dim=1))
    p, points = x.sigmoid(), 16
    dice_one = 1 - (2 * p * points + 1) / (p * points + points + 1)
    dice_zero = 1 - 1 / (p * points + 1)
    torch.testing.assert_close(terms["dice"][0], torch.stack([dice_one, dice_zero], dim=1))


def test_grouped_matching_only_pairs_within_groups() -> None:
    class_logits, mask_logits, targets = _random_problem(0, queries=6, targets=4)
    targets.groups = [torch.tensor([0, 1, 1, 0])]
    query_groups = torch.tensor([1, 1, 1, 0, 0, 0])
    rows, cols = HungarianMatcher(num_points=64)(class_logits, mask_logits, targets, query_groups)[0]
    assert len(rows) == 4
    for q, t in zip(rows.tolist(), cols.tolist()):
        assert query_groups[q] == targets.groups[0][t]


def test_non_finite_cost_names_the_image_and_term() -> None:
    class_logits, mask_logits, targets = _random_problem(0)
    class_logits = torch.cat([class_logits, class_logits])
    mask_logits = torch.cat([mask_logits, mask_logits])
    mask_logits[1, 2, 0, 0] = float("nan")
    targets = Targets(targets.classes * 2, targets.masks * 2)
    with pytest.raises(NonFiniteCostError, match=r"image 1 of the batch has \d+ non-finite values in the 'mask' cost"):
        HungarianMatcher(num_points=64)(class_logits, mask_logits, targets)


def test_criterion_by_hand_and_deep_supervision_sums_layers() -> None:
    class_logits = torch.tensor([[[1.0, 0.0, 0.5], [0.2, 0.3, 0.1]]])
    mask_logits = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous()
    targets = Targets([torch.tensor([1])], [torch.ones(1, 4, 4)])
    # constant masks and border padding: every sampled point has the same logit and target
    criterion = SetCriterion(HungarianMatcher(num_points=16), num_points=16, padding_mode="border")
    matches = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 <-> the target
    losses = criterion.layer_losses(class_logits, mask_logits, targets, matches, num_masks=1.0)
    log_probs = class_logits[0].log_softmax(-1)
    # CE with weights: (1·-log p0[1] + 0.1·-log p1[no object]) / (1 + 0.1)
    expected_ce = (-log_probs[0, 1] - 0.1 * log_probs[1, 2]) / 1.1
    torch.testing.assert_close(losses["class"], 2.0 * expected_ce)
    p = torch.tensor(1.5).sigmoid()
    torch.testing.assert_close(losses["mask"], 5.0 * F.softplus(torch.tensor(-1.5)))
    torch.testing.assert_close(losses["dice"], 5.0 * (1 - (2 * p * 16 + 1) / (p * 16 + 16 + 1)))
    single = criterion([QueryPrediction(class_logits, mask_logits)], targets)
    triple = criterion([QueryPrediction(class_logits, mask_logits)] * 3, targets)
    for name in ("class", "mask", "dice", "loss"):
        torch.testing.assert_close(triple[name], 3 * single[name])


def test_masked_attention_attends_only_inside_the_mask_and_empty_masks_attend_everywhere() -> None:
    mask_logits = torch.full((1, 3, 4, 4), -5.0)
    mask_logits[0, 0, :2, :2] = 5.0  # query 0: top-left quarter
    mask_logits[0, 1, 3, 3] = 5.0  # query 1: one pixel; query 2: empty
    blocked = attention_mask_from_masks(mask_logits, (4, 4), heads=2)
    assert blocked.shape == (2 * 1, 3, 16)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        _, weights = attention(
            torch.randn(1, 3, 8), torch.randn(1, 16, 8), torch.randn(1, 16, 8), attn_mask=blocked, need_weights=True
        )
    inside = mask_logits[0].flatten(1) > 0
    assert torch.allclose(weights[0, 0][~inside[0]], torch.zeros(12)) and weights[0, 0][inside[0]].sum() == pytest.approx(1.0)
    assert weights[0, 1, 15] == pytest.approx(1.0)
    assert bool((weights[0, 2] > 0).all())  # the empty-mask rule


def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Plain bilinear sample of ``value (C, H, W)`` at normalised (x, y), zero outside (align_corners=False)."""
    channels, height, width = value.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(channels)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < width and 0 <= yi < height:
            out += value[:, yi, xi] * (1 - abs(px - xi)) * (1 - abs(py - yi))
    return out


def test_deformable_attention_equals_a_loop_reference() -> None:
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    batch, queries, heads, dim, points = 2, 3, 2, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.2 - 0.1  # some outside
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    for b, q, m in itertools.product(range(batch), range(queries), range(heads)):
        expected = torch.zeros(dim)
        for level, (h, w) in enumerate(shapes):
            grid = per_level[level][b, :, m].t().reshape(dim, h, w)
            for p in range(points):
                x, y = locations[b, q, m, level, p].tolist()
                expected += weights[b, q, m, level, p] * _bilinear(grid, x, y)
        torch.testing.assert_close(out[b, q, m * dim : (m + 1) * dim], expected, rtol=1e-4, atol=1e-5)


def test_semantic_inference_by_hand() -> None:
    class_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])
    mask_logits = torch.tensor([[[[0.0, 4.0]], [[-2.0, 1.0]]]])  # (1, 2, 1, 2)
    scores = semantic_inference(class_logits, mask_logits)
    p = class_logits[0].softmax(-1)
    m = mask_logits[0, :, 0].sigmoid()
    for k in range(2):
        for x in range(2):
            assert scores[0, k, 0, x] == pytest.approx(float(p[0, k] * m[0, x] + p[1, k] * m[1, x]), abs=1e-6)


@pytest.mark.parametrize("pixel_decoder,decoder", [("msdeform", "mask2former"), ("fpn", "maskformer")])
@pytest.mark.parametrize("class_head", ["text", "objectness", "none"])
def test_every_parameter_gets_a_gradient_and_class_agnostic_modes_train_with_masks(pixel_decoder, decoder, class_head) -> None:
    torch.manual_seed(0)
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    segmenter = QuerySegmenter(
        channels, strides, joint_dim=12, pixel_decoder=pixel_decoder, decoder=decoder, class_head=class_head,
        dim=32, mask_dim=16, num_queries=5, decoder_layers=3, heads=4, ffn_dim=32, encoder_layers=1, encoder_ffn_dim=32,
    )  # fmt: skip
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :8] = 255
    targets = targets_from_labels(labels)
    if class_head == "objectness":  # proposals: every segment is "object" (class 0)
        targets = Targets([torch.zeros_like(c) for c in targets.classes], targets.masks)
    predictions = segmenter(features, torch.randn(3, 12) if class_head == "text" else None)
    assert len(predictions) == (4 if decoder == "mask2former" else 3)
    assert predictions[-1].mask_logits.shape == (2, 5, 16, 16)
    criterion = SetCriterion(HungarianMatcher(cost_class=0.0 if class_head == "none" else 2.0, num_points=64), num_points=64)
    losses = criterion(predictions, targets)
    assert ("class" in losses) == (class_head != "none")
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in segmenter.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_conv_dim_sets_the_pixel_decoder_width_apart_from_the_transformer_decoder() -> None:
    """Mask2Former's CONVS_DIM vs HIDDEN_DIM: a narrower pixel decoder feeds the decoder through one 1x1
    input projection per level (its own weights); the default (None) keeps one width, no projection."""
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    sizes = dict(joint_dim=12, dim=32, mask_dim=16, num_queries=5, decoder_layers=3, heads=4, ffn_dim=32,
                 encoder_layers=1, encoder_ffn_dim=32)  # fmt: skip
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    narrow = QuerySegmenter(channels, strides, conv_dim=16, **sizes)
    mask_features, multi_scale = narrow.pixel_decoder(features)
    assert [f.shape[1] for f in multi_scale] == [16, 16, 16] and mask_features.shape[1] == 16
    projections = list(narrow.decoder.input_proj)
    assert len(projections) == 3 and len({id(p.weight) for p in projections}) == 3
    assert all(isinstance(p, torch.nn.Conv2d) and (p.in_channels, p.out_channels) == (16, 32) for p in projections)
    assert narrow(features, torch.randn(3, 12))[-1].mask_logits.shape == (2, 5, 16, 16)
    same = QuerySegmenter(channels, strides, **sizes)
    assert [f.shape[1] for f in same.pixel_decoder(features)[1]] == [32, 32, 32]
    assert all(isinstance(p, torch.nn.Identity) for p in same.decoder.input_proj)


def test_query_baseline_trains_end_to_end_and_writes_metrics(make_cfg) -> None:
    from zeroseg.train import train

    # 64-px scenes: at 32 px the 1/32 map is 1x1 and GroupNorm has one value per group
    cfg = make_cfg([*QUERY, "method.segmenter.dim=32", "method.segmenter.mask_dim=32", "method.matcher.num_points=256",
                    "method.criterion.num_points=256", "dataset.train_dataset.scene.image_size=64"])  # fmt: skip
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(written["mIoU"]) and len(written["per_class_iou"]) == 16
    model = objects["model"]
    assert model._lr_multiplier("backbone.model.conv1.weight") == 1.0  # toy setting: random backbone at the full LR
    with torch.no_grad():
        scores = model.predict_logits(torch.rand(1, 3, 64, 64), model.class_text_embeddings)
    assert scores.shape[1] == 16 and bool((scores >= 0).all())


@pytest.mark.parametrize("name,steps", [("voc", 20000), ("coco_stuff", 80000)])
def test_query_baseline_recipes_compose(make_cfg, name: str, steps: int) -> None:
    cfg = make_cfg([f"experiment=query_baseline_{name}_resnet101"], tiny=False)
    assert cfg.method.segmenter.num_queries == 100 and cfg.method.segmenter.dim == 256
    assert cfg.method.segmenter.decoder_layers == 9 and cfg.method.matcher.num_points == 12544
    assert cfg.method.optimizer.lr == 1.0e-4 and dict(cfg.method.lr_multipliers) == {"backbone": 0.1}
    assert cfg.method.input_scale == 1.0  # the toy setting's x2 never reaches a paper recipe
    # nor its narrower pixel decoder or warm-up; the clip is Mask2Former's own
    assert cfg.method.segmenter.conv_dim == 256 and cfg.method.segmenter.mask_dim == 256
    assert cfg.method.scheduler.warmup_steps == 0 and cfg.method.gradient_clip_norm == 0.01
    assert cfg.trainer.max_steps == steps and cfg.dataset.batch_size == 16 and cfg.backbone.model_name == "resnet101"


def test_input_scale_resizes_what_the_backbone_sees_and_scores_stay_at_the_input_size(make_cfg) -> None:
    from zeroseg.build import build_run

    model = build_run(make_cfg([*QUERY, "method.input_scale=2"]), with_callbacks=False)["model"].eval()
    seen_sizes = []
    model.backbone.register_forward_hook(lambda module, inputs, output: seen_sizes.append(tuple(inputs[0].shape[-2:])))
    images = torch.rand(2, 3, 32, 48)
    embeddings = torch.nn.functional.normalize(torch.randn(5, model.teacher.embed_dim), dim=-1)
    with torch.no_grad():
        scores = model.predict_logits(images, embeddings)
        masks = model.predictions(images, embeddings)[-1].mask_logits
    assert seen_sizes == [(64, 96), (64, 96)]
    assert scores.shape == (2, 5, 32, 48) and masks.shape[-2:] == (16, 24)  # 1/4 of the resized images
    with pytest.raises(ValueError, match=r"method.input_scale=0: expected a positive factor"):
        build_run(make_cfg([*QUERY, "method.input_scale=0"], subdir="bad"), with_callbacks=False)


def test_calibration_adds_gamma_to_the_unseen_query_logits_at_evaluation_only(make_cfg) -> None:
    from zeroseg.build import build_run
    from zeroseg.predict import open_vocabulary_logits

    gamma = 1.5
    model = build_run(make_cfg([*QUERY, f"method.calibration={gamma}"]), with_callbacks=False)["model"].eval()
    unseen = list(model.unseen_class_ids)
    assert unseen and len(unseen) < model.split.num_classes
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        final = model.predictions(images, model.class_text_embeddings)[-1]
        scores = model.segment(images)
    # by hand: + gamma on the unseen classes' logits (never "no object"), softmax, drop no object, then
    # Mask2Former's order (mask logits upsampled, sigmoid, sum over queries)
    logits = final.class_logits.clone()
    logits[..., unseen] += gamma
    probabilities = logits.softmax(-1)[..., :-1]
    masks = F.interpolate(final.mask_logits, size=(32, 32), mode="bilinear", align_corners=False).sigmoid()
    expected = torch.einsum("bqk,bqhw->bkhw", probabilities, masks)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    plain = torch.einsum("bqk,bqhw->bkhw", final.class_logits.softmax(-1)[..., :-1], masks)
    assert (scores[:, unseen] > plain[:, unseen]).all()  # the shift moves score to the unseen classes
    # zeroseg.predict scores arbitrary classes without the benchmark's shift
    embeddings = model.class_text_embeddings
    with torch.no_grad():
        torch.testing.assert_close(open_vocabulary_logits(model, images, embeddings), plain, rtol=1e-5, atol=1e-6)
    # training never sees it: the same losses with and without gamma
    batch = {"image": images, "label": torch.randint(0, len(model.train_class_names), (2, 32, 32))}  # training ids
    losses = {}
    for value in (0.0, gamma):
        model.calibration = value
        torch.manual_seed(1)
        with torch.no_grad():
            losses[value] = model.training_losses(batch)["loss"]
    torch.testing.assert_close(losses[0.0], losses[gamma])
