"""CLIP-to-Seg (method=c2s): its equations against hand computations, edge cases, gradients,
and that inference never calls the teacher's visual encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroseg.build import build_run
from zeroseg.toolkit.dense import attention_pooled_feature, region_means
from zeroseg.toolkit.losses import dice_loss, info_nce, softmax_focal_loss
from zeroseg.train import train

from conftest import compose_sweep_jobs

# 32-pixel test scenes give the toy CLIP a 4x4 token grid: windows up to 3
C2S = ["method=c2s", "method.head.width=32", "method.decoder_heads=4", "method.pseudo_masks.window_sizes=[1,3]"]


def test_attention_pooled_feature_by_hand() -> None:
    features = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])  # D=2, L=3
    query = torch.tensor([[1.0, 1.0]])
    scores = torch.tensor([1.0, 1.0, 2.0]) / math.sqrt(2)
    weights = torch.softmax(scores, 0)
    expected = (features[0] * weights).sum(1)
    torch.testing.assert_close(attention_pooled_feature(features, query)[0], expected)


def test_region_means_equal_a_loop() -> None:
    features = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[1] = 255
    labels[1, 0, 0] = 7
    region_labels = torch.tensor([[0, 2, 1], [7, -1, -1]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    means, counts = region_means(features, labels, region_labels, valid)
    for b in range(2):
        for r in range(3):
            mask = (labels[b] == region_labels[b, r]) & valid[b, r]
            assert counts[b, r] == mask.sum()
            expected = features[b][:, mask].mean(1) if mask.any() else torch.zeros(3)
            torch.testing.assert_close(means[b, r], expected)


def test_info_nce_by_hand() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    loss = info_nce(queries, keys, torch.tensor([0, 2]), temperature=0.5)
    logits = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]) / 0.5
    expected = -(logits.log_softmax(1)[0, 0] + logits.log_softmax(1)[1, 2]) / 2
    torch.testing.assert_close(loss, expected)
    masked = info_nce(queries, keys, torch.tensor([0, -1]), 0.5, key_valid=torch.tensor([True, False, True]))
    torch.testing.assert_close(masked, -torch.tensor([2.0, 0.0]).log_softmax(0)[0])


def test_focal_and_dice_by_hand() -> None:
    logits = torch.tensor([[[[2.0]], [[0.0]], [[float("-inf")]]], [[[0.0]], [[1.0]], [[float("-inf")]]]])  # (2, 3, 1, 1)
    target = torch.tensor([[[0]], [[1]]])
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(softmax_focal_loss(logits, target, gamma=0.0), ce)
    p = torch.tensor([torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(1.0))])
    torch.testing.assert_close(softmax_focal_loss(logits, target, gamma=2.0), (-((1 - p) ** 2) * p.log()).mean())
    # dice: classes 0 and 1 present; p0 = (s(2), s(-1)), p1 = (s(-2), s(1))
    p0 = torch.sigmoid(torch.tensor([2.0, -1.0]))
    p1 = torch.sigmoid(torch.tensor([-2.0, 1.0]))
    dice0 = (2 * p0[0] + 1) / (p0.sum() + 1 + 1)
    dice1 = (2 * p1[1] + 1) / (p1.sum() + 1 + 1)
    torch.testing.assert_close(dice_loss(logits, target), 1 - (dice0 + dice1) / 2)
    ignored = torch.full_like(target, 255)
    assert softmax_focal_loss(logits, ignored) == 0 and dice_loss(logits, ignored) == 0


def test_losses_gradients_and_edge_cases(make_cfg) -> None:
    objects = build_run(make_cfg(C2S))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model.train()
    losses = model.training_losses(batch)
    assert set(losses) == {"global", "local", "focal", "dice", "ce", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert int(model.token_bank.filled) == 8
    # no seen pixel / all ignore / every pixel seen (no latent region)
    for labels in (torch.full_like(batch["label"], 255), torch.zeros_like(batch["label"])):
        edge = model.training_losses({"image": batch["image"], "label": labels})
        assert all(torch.isfinite(v) for v in edge.values()), edge


@pytest.mark.parametrize(
    "switch", ["method.global_distillation=false", "method.local_distillation=false", "method.latent_embedding=false"]
)
def test_each_term_can_be_switched_off(make_cfg, switch: str) -> None:
    objects = build_run(make_cfg([*C2S, switch]))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    losses = model.training_losses(next(iter(datamodule.train_dataloader())))
    term = {"global": "global", "local": "local"}.get(switch.split(".")[1].split("_")[0])
    if term:
        assert term not in losses
    assert torch.isfinite(losses["loss"])


def test_c2s_trains_end_to_end_and_inference_never_calls_the_teacher_visual_encoder(make_cfg) -> None:
    metrics, objects = train(make_cfg([*C2S, "test=false"]))
    model, trainer, datamodule = objects["model"], objects["trainer"], objects["datamodule"]
    assert trainer.global_step == 4 and math.isfinite(metrics["train/loss"])
    calls = []
    original = model.teacher.encode_image
    model.teacher.encode_image = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert calls == []
    assert set(model.test_results["per_class_iou"]) == set(datamodule.class_names)


@pytest.mark.parametrize("experiment,jobs", [("c2s_ablation_modules", 8), ("c2s_ablation_windows", 3), ("c2s_ablation_bank", 5)])
def test_ablation_sweeps_compose_every_job(experiment: str, jobs: int) -> None:
    configs = compose_sweep_jobs(experiment)
    assert len(configs) == jobs
    assert all(cfg.method._target_ == "zeroseg.methods.CLIPToSeg" for _, cfg in configs)


def test_bank_size_zero_uses_the_batch_only(make_cfg) -> None:
    objects = build_run(make_cfg([*C2S, "method.bank_size=0"]))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    assert model.token_bank is None
    assert torch.isfinite(model.training_losses(next(iter(datamodule.train_dataloader())))["global"])


def test_c2s_with_the_attention_region_encoder(make_cfg) -> None:
    # the attention encoder needs a CLS-pooled teacher: the tiny random one (2 blocks)
    overrides = [*C2S, "clip=tiny_random", "method.region_encoder=attention", "method.region_from_layer=-1"]
    objects = build_run(make_cfg(overrides))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    losses = model.training_losses(next(iter(datamodule.train_dataloader())))
    assert all(torch.isfinite(v) for v in losses.values())


def test_c2s_with_the_attention_encoder_trains_in_the_toy_world(make_cfg, monkeypatch) -> None:
    # the shipped toy CLIP pools by its CLS token, so the one-pass IP-CLIP-style encoder runs on it
    from zeroseg.toolkit import region_tokens

    calls = []
    original = region_tokens._attention_region_tokens
    monkeypatch.setattr(region_tokens, "_attention_region_tokens", lambda *a, **k: calls.append(1) or original(*a, **k))
    metrics, objects = train(make_cfg([*C2S, "clip=toy", "method.region_encoder=attention", "test=false"]))
    assert objects["trainer"].global_step == 4 and math.isfinite(metrics["train/loss"])
    assert len(calls) == 4  # one batched pass per training step
    assert objects["model"].teacher.model.visual.pool_type == "tok"
