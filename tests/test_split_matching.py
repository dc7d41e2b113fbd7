"""Split Matching (method=split_matching): grouped matching vs brute force within each group, the class cost,
L_cos / focal / IoU / dice by hand, the MFE's fusion, its gradients in training and its absence at inference,
random queries under a seed, a batch without candidate regions, a few steps through train(), Fig. 5's script,
the recipes and every ablation sweep job with its swept values and paper row name."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES, compose_sweep_jobs, repo_root
from zeroseg.build import build_run
from zeroseg.methods import split_matching as sm
from zeroseg.methods.split_matching import (
    MultiScaleFeatureEnhancement,
    SemanticPrediction,
    SplitCriterion,
    SplitMatcher,
    candidate_cosine_loss,
    split_targets,
)
from zeroseg.toolkit.matching import Targets
from zeroseg.toolkit.set_losses import mask_dice_loss, sigmoid_focal_loss, soft_iou_loss

SM = "zeroseg.methods.SplitMatching"
# the tiny world without the dense head's key; a narrow stack on 64-px scenes (a 1/32 map of 2x2 at x1)
TINY = [o for o in TINY_OVERRIDES if not o.startswith("method")] + [
    "method=split_matching",
    "method.segmenter.dim=32",
    "method.segmenter.mask_dim=32",
    "method.segmenter.ffn_dim=64",
    "method.segmenter.encoder_ffn_dim=64",
    "method.segmenter.num_queries=6",
    "method.candidate_queries=4",
    "method.random_queries=3",
    "method.matcher.num_points=128",
    "method.criterion.num_points=128",
    "method.input_scale=1.0",
    "dataset.train_dataset.scene.image_size=64",
]


def _cfg(make_cfg, *extra: str, subdir: str = ""):
    return make_cfg([*TINY, *extra], tiny=False, subdir=subdir)


def _model_and_batch(make_cfg, *extra: str):
    objects = build_run(_cfg(make_cfg, *extra), with_callbacks=False)
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    return model, next(iter(datamodule.train_dataloader()))


# -- matching --------------------------------------------------------------------------------------------


def _grouped_problem(seed: int, seen_queries=4, candidate_queries=3, seen_targets=2, candidate_targets=2, columns=6):
    generator = torch.Generator().manual_seed(seed)
    queries = seen_queries + candidate_queries
    class_logits = torch.randn(1, queries, columns, generator=generator) * 3
    mask_logits = torch.randn(1, queries, 8, 8, generator=generator) * 3
    count = seen_targets + candidate_targets
    masks = (torch.rand(count, 8, 8, generator=generator) > 0.5).float()
    classes = torch.cat([torch.randperm(3, generator=generator)[:seen_targets], 3 + torch.arange(candidate_targets)])
    groups = torch.tensor([0] * seen_targets + [1] * candidate_targets)
    query_groups = torch.tensor([0] * seen_queries + [1] * candidate_queries)
    return class_logits, mask_logits, Targets([classes], [masks], groups=[groups]), query_groups


@pytest.mark.parametrize("seed", range(4))
def test_split_matching_equals_brute_force_within_each_group_and_never_crosses(seed: int) -> None:
    class_logits, mask_logits, targets, query_groups = _grouped_problem(seed)
    matcher = SplitMatcher(num_points=64)
    torch.manual_seed(seed)
    terms = matcher.cost_terms(class_logits, mask_logits, targets)
    cost = (2 * terms["class"] + 5 * terms["mask"] + 5 * terms["dice"])[0]
    torch.manual_seed(seed)  # the same sampled points
    rows, cols = matcher(class_logits, mask_logits, targets, query_groups)[0]
    target_groups = targets.groups[0]
    assert all(int(query_groups[q]) == int(target_groups[t]) for q, t in zip(rows.tolist(), cols.tolist()))
    best = 0.0
    for group in (0, 1):  # brute force: every injective assignment of the group's targets to its queries
        group_queries = torch.nonzero(query_groups == group).flatten().tolist()
        group_targets = torch.nonzero(target_groups == group).flatten().tolist()
        best += min(
            sum(float(cost[q, t]) for q, t in zip(perm, group_targets))
            for perm in itertools.permutations(group_queries, len(group_targets))
        )
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)
    assert sorted(cols.tolist()) == list(range(4))
    # the class cost is -sigmoid(S) at the target's column of E
    expected = -class_logits[0].sigmoid()[:, targets.classes[0]]
    torch.testing.assert_close(terms["class"][0], expected)


def test_an_image_without_candidate_targets_leaves_candidate_queries_unmatched() -> None:
    class_logits, mask_logits, targets, query_groups = _grouped_problem(0, candidate_targets=0)
    rows, cols = SplitMatcher(num_points=64)(class_logits, mask_logits, targets, query_groups)[0]
    assert len(rows) == 2 and bool((query_groups[rows] == 0).all())


def test_split_targets_list_seen_then_candidate_segments_with_their_columns() -> None:
    labels = torch.tensor([[[0, 0, 255, 255], [2, 2, 255, 255]]])
    candidate_map = torch.tensor([[[255, 255, 7, 7], [255, 255, 9, 255]]])
    targets = split_targets(labels, candidate_map, torch.tensor([[7, 9, -1]]), torch.tensor([[True, True, False]]), num_seen=5)
    assert targets.classes[0].tolist() == [0, 2, 5, 6] and targets.groups[0].tolist() == [0, 0, 1, 1]
    assert targets.masks[0][2].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert targets.masks[0][3].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]
    assert targets.ignore[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]


# -- losses by hand ----------------------------------------------------------------------------------------


def test_sigmoid_focal_loss_by_hand() -> None:
    logits, targets = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]])
    expected = 0.0
    for x, t in zip([2.0, -1.0, 0.5], [1, 0, 0]):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        alpha_t = 0.25 if t else 0.75
        expected += alpha_t * (1 - p_t) ** 2 * -math.log(p_t)
    assert float(sigmoid_focal_loss(logits, targets, normalizer=2.0)) == pytest.approx(expected / 2, rel=1e-5)
    weight = torch.tensor([[1.0, 1.0, 0.0]])  # a padded column does not count
    p = 1 / (1 + math.exp(-0.5))
    dropped = 0.75 * p**2 * -math.log(1 - p)
    assert float(sigmoid_focal_loss(logits, targets, weight=weight)) == pytest.approx(expected - dropped, rel=1e-5)


def test_soft_iou_and_dice_losses_by_hand() -> None:
    logits = torch.tensor([[0.0, 100.0, -100.0, 0.0]])  # p = 0.5, 1, 0, 0.5
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    intersection, p_sum, t_sum = 0.5 + 1.0, 0.5 + 1.0 + 0.5, 2.0
    iou = 1 - (intersection + 1) / (p_sum + t_sum - intersection + 1)
    dice = 1 - (2 * intersection + 1) / (p_sum + t_sum + 1)
    assert float(soft_iou_loss(logits, targets)[0]) == pytest.approx(iou, rel=1e-6)
    assert float(mask_dice_loss(logits, targets)[0]) == pytest.approx(dice, rel=1e-6)


def test_candidate_cosine_loss_by_hand_and_zero_without_candidates() -> None:
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    anchors = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    assert float(candidate_cosine_loss(vectors, anchors)) == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2, abs=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = candidate_cosine_loss(empty, torch.zeros(0, 2))
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_criterion_terms_for_a_given_assignment_by_hand() -> None:
    # 3 queries (2 seen, 1 candidate), E has 2 seen columns + 1 candidate column (+1 padded)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 3, 4, generator=generator)
    class_embeddings = torch.randn(1, 4, 4, generator=generator)
    column_valid = torch.tensor([[True, True, True, False]])
    logits = torch.randn(1, 3, 4, generator=generator)
    masks = torch.ones(2, 4, 4)
    targets = Targets([torch.tensor([1, 2])], [masks], groups=[torch.tensor([0, 1])])
    prediction = SemanticPrediction(None, torch.full((1, 3, 4, 4), 3.0), embeddings)
    criterion = SplitCriterion(SplitMatcher(), num_points=16, padding_mode="border")
    matches = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]  # seen query 0 -> class 1, candidate query 2 -> column 2
    losses = criterion.layer_losses(logits, column_valid, prediction, class_embeddings, targets, matches, num_masks=2.0)
    wanted = torch.zeros(1, 3, 4)
    wanted[0, 0, 1] = wanted[0, 2, 2] = 1.0
    focal = sigmoid_focal_loss(logits[..., :3], wanted[..., :3], normalizer=2.0)
    assert float(losses["focal"]) == pytest.approx(2.0 * float(focal), rel=1e-5)
    cos = 1 - F.cosine_similarity(embeddings[0, 2], class_embeddings[0, 2], dim=0)
    assert float(losses["cos"].detach()) == pytest.approx(float(cos), rel=1e-5)
    p = torch.sigmoid(torch.tensor(3.0))  # every point of a constant mask: closed forms
    iou = 1 - (16 * p + 1) / (16 + 1)
    assert float(losses["iou"]) == pytest.approx(5.0 * 2 * float(iou) / 2.0, rel=1e-5)


# -- MFE ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["gn", "bn", "none"])
def test_mfe_fuses_coarse_to_fine(norm: str) -> None:
    torch.manual_seed(0)
    mfe = MultiScaleFeatureEnhancement(8, 16, norm=norm).eval()
    maps = [torch.randn(2, 8, s, s) for s in (2, 4, 8)]
    blocks = list(mfe.blocks)
    expected = blocks[0](maps[0])
    for block, feature in zip(blocks[1:], maps[1:]):
        expected = F.interpolate(expected, size=feature.shape[-2:], mode="bilinear", align_corners=False) + block(feature)
    torch.testing.assert_close(mfe(maps), expected)
    kinds = {type(m).__name__ for m in mfe.modules()}
    assert ({"gn": "GroupNorm", "bn": "BatchNorm2d"}.get(norm) in kinds) if norm != "none" else not kinds & {"GroupNorm", "BatchNorm2d"}


def test_mfe_gets_gradients_in_training_and_is_never_called_at_inference(make_cfg) -> None:
    model, batch = _model_and_batch(make_cfg)
    calls = []
    model.mfe.register_forward_hook(lambda *_: calls.append(1))
    assignments = []  # every assignment of the step: seen queries to seen segments, candidates to Y_u only
    match = model.criterion.matcher.forward
    model.criterion.matcher.forward = lambda *a: assignments.append((a[2], a[3], match(*a))) or assignments[-1][2]
    losses = model.training_losses(batch)
    assert len(assignments) == 4  # deep supervision: the initial queries + 3 layers
    for targets, query_groups, matches in assignments:
        assert query_groups.tolist() == [0] * 6 + [1] * 4
        for b, (rows, cols) in enumerate(matches):
            assert torch.equal(query_groups[rows], targets.groups[b][cols])
            wanted = sum(min(int((query_groups == g).sum()), int((targets.groups[b] == g).sum())) for g in (0, 1))
            assert len(rows) == wanted  # each group matched as far as its queries reach
    assert any(bool((t.groups[b] == 1).any()) for t, _, _ in assignments for b in range(len(t.groups)))
    assert calls == [1] and {"mfe_ce", "mfe_focal", "focal", "iou", "dice", "cos"} <= set(losses)
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if not name.startswith("teacher."):
            assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
    assert all(float(p.grad.abs().sum()) > 0 for p in model.mfe.parameters())
    calls.clear()
    model.eval()
    with torch.no_grad():
        model.segment(batch["image"][:2])
        model.predict_logits(batch["image"][:1], model.class_text_embeddings)
    assert calls == []


# -- inference -----------------------------------------------------------------------------------------------


def test_random_queries_are_deterministic_under_a_seed(make_cfg) -> None:
    model, batch = _model_and_batch(make_cfg)
    model.eval()
    images = batch["image"][:2]
    first, second = model.random_queries(), model.random_queries()
    assert first[0].shape == (3, 32) and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with torch.no_grad():
        predictions, groups = model.query_predictions(images)
        scores_a = model.predict_logits(images, model.class_text_embeddings)
        scores_b = model.predict_logits(images, model.class_text_embeddings)
    assert groups.tolist() == [0] * 6 + [1] * 4 + [2] * 3 and predictions[-1].mask_logits.shape[1] == 13
    torch.testing.assert_close(scores_a, scores_b)
    model.random_query_seed = 1
    assert not torch.equal(model.random_queries()[0], first[0])
    with torch.no_grad():
        assert not torch.allclose(model.predict_logits(images, model.class_text_embeddings), scores_a)
    # refresh: a new draw per call, the same stream for the same seed
    model.random_query_seed, model.random_query_refresh = 0, True
    stream = [model.random_queries()[0] for _ in range(2)]
    assert torch.equal(stream[0], first[0]) and not torch.equal(stream[1], stream[0])
    # the learned query tables are back to their own size after the call
    assert model.segmenter.decoder.query_pos.weight.shape[0] == 10


# -- training edge cases and end to end -----------------------------------------------------------------------


def test_a_batch_without_candidate_regions_trains_without_nan(make_cfg, monkeypatch) -> None:
    model, batch = _model_and_batch(make_cfg)
    # the pseudo masks find nothing: Y_p = Y_s, no C_u in the batch
    monkeypatch.setattr(sm, "generate_pseudo_masks", lambda dense, labels, *a, **k: labels.clone())
    losses = model.training_losses(batch)
    assert all(bool(torch.isfinite(v.detach())) for v in losses.values()), losses
    assert float(losses["cos"].detach()) == 0.0
    losses["loss"].backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_one_image_without_candidates_in_a_batch_with_some(make_cfg, monkeypatch) -> None:
    model, batch = _model_and_batch(make_cfg)
    original = sm.generate_pseudo_masks

    def first_image_without(dense, labels, *args, **kwargs):
        pseudo = original(dense, labels, *args, **kwargs)
        pseudo[0] = labels[0]
        return pseudo

    monkeypatch.setattr(sm, "generate_pseudo_masks", first_image_without)
    losses = model.training_losses(batch)
    assert all(bool(torch.isfinite(v.detach())) for v in losses.values())
    assert float(losses["cos"].detach()) > 0  # the other images still train their candidate queries


def test_split_matching_trains_end_to_end_and_draws_its_candidates(make_cfg, tmp_path) -> None:
    from zeroseg.train import train

    cfg = _cfg(make_cfg, "test=false")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4 and math.isfinite(metrics["train/loss"])
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    sys.path.insert(0, str(repo_root() / "scripts"))
    try:
        import show_candidates
    finally:
        sys.path.pop(0)
    out = tmp_path / "fig5.png"
    assert show_candidates.main([str(run_dir), "--out", str(out), "--images", "2"]) == 0
    from PIL import Image

    width, height = Image.open(out).size
    assert width == 4 * 64 * 2 and height >= 2 * 64 * 2  # 4 panels per row, 2 rows, x2


# -- configs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps", [("voc", 20000), ("coco_stuff", 80000)])
def test_recipes_compose(make_cfg, name: str, steps: int) -> None:
    cfg = make_cfg([f"experiment=split_matching_{name}_resnet101"], tiny=False)
    assert cfg.method._target_ == SM and cfg.backbone.model_name == "resnet101" and cfg.clip.arch == "ViT-B-16"
    assert cfg.method.segmenter.num_queries == 100 and cfg.method.candidate_queries == 50 and cfg.method.random_queries == 50
    assert cfg.method.segmenter.decoder_layers == 9 and cfg.method.input_scale == 1.0
    assert cfg.method.optimizer.lr == 1.0e-4 and dict(cfg.method.lr_multipliers) == {"backbone": 0.1}
    assert cfg.trainer.max_steps == steps and cfg.dataset.batch_size == 16


TABLE_2 = {  # row config -> (method target, mfe, random queries)
    "baseline": ("zeroseg.methods.QueryBaseline", None, None),
    "sm": (SM, False, 0),
    "sm_mfe": (SM, True, 0),
    "sm_mfe_rq": (SM, True, 50),
}
SWEEPS = {  # experiment -> (title, {override: paper row})
    "split_matching_ablation_modules": ("Table 2", {f"+experiment/split_matching_table_2={k}": v for k, v in
                                                    zip(TABLE_2, ["Baseline", "+ SM", "+ SM + MFE", "+ SM + MFE + RQ"])}),
    "split_matching_ablation_embedding": ("Table 3", {"method.candidate_embedding=features": "F_u",
                                                      "method.candidate_embedding=features_mlp": "F_u + MLP",
                                                      "method.candidate_embedding=cls_tokens": "C_u"}),
    "split_matching_ablation_norm": ("Table 4", {"method.mfe_norm=none": "No Norm", "method.mfe_norm=bn": "BN",
                                                 "method.mfe_norm=gn": "GN"}),
}  # fmt: skip


def _table_2_jobs(extra=()):
    """Table 2's jobs: its sweep adds a row config (+experiment/...), which compose_sweep_jobs' value check
    cannot select; each row is checked here by what it must set."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    jobs = []
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        base = compose("train", overrides=["experiment=split_matching_ablation_modules"], return_hydra_config=True)
        (key, values), = OmegaConf.to_container(base.hydra.sweeper.params).items()  # fmt: skip
        for row in values.split(","):
            override = f"{key}={row}"
            cfg = compose("train", overrides=["experiment=split_matching_ablation_modules", override, *extra])
            jobs.append(([override], row, cfg))
    GlobalHydra.instance().clear()
    return jobs


@pytest.mark.parametrize("experiment", sorted(SWEEPS))
def test_each_sweep_job_composes_in_the_ablation_setting_with_its_swept_values(experiment: str) -> None:
    title, rows = SWEEPS[experiment]
    if experiment == "split_matching_ablation_modules":
        jobs = [(overrides, cfg) for overrides, _, cfg in _table_2_jobs()]
        for _, row, cfg in _table_2_jobs():
            target, mfe, random_queries = TABLE_2[row]
            assert cfg.method._target_ == target, row
            if target == SM:
                assert (cfg.method.mfe, cfg.method.random_queries, cfg.method.candidate_queries) == (mfe, random_queries, 50)
            else:
                assert "mfe" not in cfg.method
    else:
        jobs = compose_sweep_jobs(experiment)  # checks each swept value in the composed config
        for _, cfg in jobs:  # Tables 3 and 4 vary Table 2's full model
            assert cfg.method._target_ == SM and cfg.method.mfe and cfg.method.random_queries == 50
    assert len(jobs) == len(rows)
    labels = {"".join(k.split()).lower(): v for k, v in jobs[0][1].sweep_table.rows.items()}
    assert title in jobs[0][1].sweep_table.title
    for overrides, cfg in jobs:
        assert cfg.dataset.split.benchmark == "coco_stuff" and cfg.backbone.model_name == "resnet50" and cfg.clip.arch == "ViT-B-16"
        assert cfg.trainer.max_steps == 40000 and cfg.dataset.batch_size == 16
        assert cfg.method.segmenter.num_queries == 100 and cfg.method.optimizer.lr == 1.0e-4
        key = "".join(", ".join(overrides).split()).lower()
        assert labels.get(key) == rows[overrides[0]], (experiment, overrides)


def test_table_2_rows_on_the_toy_world_proxy() -> None:
    for _, row, cfg in _table_2_jobs(extra=("+world=toy",)):
        assert cfg.clip.arch == "toy" and cfg.trainer.max_steps == 300, row
        assert cfg.method._target_ == TABLE_2[row][0]


def test_collect_sweep_renders_the_paper_row_names(tmp_path) -> None:
    sys.path.insert(0, str(repo_root() / "scripts"))
    try:
        import collect_sweep
    finally:
        sys.path.pop(0)
    title, rows = SWEEPS["split_matching_ablation_modules"]
    sweep_table = OmegaConf.to_container(_table_2_jobs()[0][2].sweep_table)
    for index, override in enumerate(reversed(list(rows))):  # job order differs from the paper's
        job = tmp_path / str(index)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([override]))
        (job / "config.yaml").write_text(yaml.safe_dump({"sweep_table": sweep_table}))
        (job / "metrics.json").write_text(json.dumps({"sIoU": 1.0, "uIoU": 2.0, "hIoU": 3.0, "mIoU": 4.0}))
    table_title, table = collect_sweep.build_table(collect_sweep.read_jobs(tmp_path))
    assert title in table_title
    assert [label for label, _ in table] == ["Baseline", "+ SM", "+ SM + MFE", "+ SM + MFE + RQ"]
