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

from zeroseg.methods.c2s import global_distillation_loss, global_feature, latent_queries
from zeroseg.toolkit.region_tokens import RegionTokens

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
    calls = []
    original = model._latent_embeddings
    model._latent_embeddings = lambda *a: calls.append(1) or original(*a)
    losses = model.training_losses(next(iter(datamodule.train_dataloader())))
    term = switch.split(".")[1].split("_")[0]  # global | local | latent
    if term == "latent":  # no decoder is built and A'_u is never generated
        assert calls == [] and not hasattr(model, "latent_decoder")
        assert {"global", "local"} <= set(losses)
    else:
        assert term not in losses and calls == [1]
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


def _hand_info_nce(query: torch.Tensor, keys: torch.Tensor, positive: int, tau: float) -> torch.Tensor:
    logits = torch.stack([F.cosine_similarity(query, k, dim=0) for k in keys]) / tau
    return -(logits[positive] - torch.logsumexp(logits, 0))


def test_global_distillation_negatives_are_the_bank_by_hand() -> None:
    torch.manual_seed(0)
    pooled, cls, bank = torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)
    # Eq. 4: each image against [its own C_g, the bank]; the other images of the batch are not negatives
    expected = torch.stack([_hand_info_nce(pooled[i], torch.cat([cls[i : i + 1], bank]), 0, 0.07) for i in range(3)]).mean()
    torch.testing.assert_close(global_distillation_loss(pooled, cls, bank, 0.07, in_batch=False), expected)
    # the named option: the batch's tokens join the bank
    keys = torch.cat([cls, bank])
    with_batch = torch.stack([_hand_info_nce(pooled[i], keys, i, 0.07) for i in range(3)]).mean()
    torch.testing.assert_close(global_distillation_loss(pooled, cls, bank, 0.07, in_batch=True), with_batch)


def test_the_method_contrasts_with_the_bank_it_holds(make_cfg) -> None:
    objects = build_run(make_cfg(C2S))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model.eval()  # no dropout: the features below are the ones the loss saw
    bank = torch.randn(5, model.teacher.embed_dim)
    model.token_bank.push(bank, gather=False)
    losses = model.training_losses(batch)
    with torch.no_grad():
        cls = model.teacher.encode_image(batch["image"])[0].float()
        features = model.dense_features(batch["image"]).float().flatten(2)
        pooled = attention_pooled_feature(features, cls)
    expected = torch.stack([_hand_info_nce(pooled[i], torch.cat([cls[i : i + 1], bank]), 0, 0.07) for i in range(len(cls))]).mean()
    torch.testing.assert_close(losses["global"].detach(), expected, rtol=1e-4, atol=1e-4)
    # the step's tokens are in the bank afterwards (negatives of the next step), the oldest ones left
    assert torch.equal(model.token_bank.tokens()[-len(cls) :], cls)


def test_global_aggregations_by_hand() -> None:
    features = torch.tensor([[[1.0, 3.0, -2.0], [0.0, -1.0, 4.0]]])
    torch.testing.assert_close(global_feature(features, torch.zeros(1, 2), "mean"), torch.tensor([[2 / 3, 1.0]]))
    assert global_feature(features, torch.zeros(1, 2), "max").tolist() == [[3.0, 4.0]]
    # attention with a zero query: uniform weights = the mean
    torch.testing.assert_close(global_feature(features, torch.zeros(1, 2), "attention"), torch.tensor([[2 / 3, 1.0]]))


def _regions(model, num_seen: int):
    """A batch of 2 images: image 0 has seen region 0, latent 16 and 17 and a padding slot; image 1 has
    seen region 1 and latent 16 (the latent ids are num_seen + j)."""
    dim = model.teacher.embed_dim
    torch.manual_seed(3)
    labels = torch.tensor([[0, num_seen, num_seen + 1, -1], [1, num_seen, -1, -1]])
    valid = labels >= 0
    tokens = torch.randn(2, 4, dim) * valid.unsqueeze(-1)
    local = torch.randn(2, 4, dim)
    return RegionTokens(tokens, labels, valid), local, valid, torch.randn(2, dim)


def test_latent_decoder_queries_are_the_latent_regions_only(make_cfg) -> None:
    model = build_run(make_cfg(C2S))["model"].eval()
    num_seen = len(model.train_text_embeddings)
    regions, local, present, cls = _regions(model, num_seen)
    with torch.no_grad():
        (embeddings, valid) = model._latent_embeddings(local, regions, present, cls, num_seen)
        assert valid.tolist() == [[True, True], [True, False]]
        # brute force, image by image, without any padding: queries F_u, keys [C_g, C_l of its regions]
        for image, latent_slots in ((0, [1, 2]), (1, [1])):
            keys = torch.cat([cls[image : image + 1], regions.tokens[image][regions.valid[image]]])
            alone = model.latent_decoder(local[image, latent_slots][None], keys[None])[0]
            torch.testing.assert_close(embeddings[image, : len(latent_slots)], alone, rtol=1e-5, atol=1e-5)
        # a seen region's feature and the padding slot's content do not move A'_u
        moved = local.clone()
        moved[0, 0] += 10.0
        moved[0, 3] = 1e3
        moved[1, 2:] = -1e3
        again, _ = model._latent_embeddings(moved, regions, present, cls, num_seen)
    torch.testing.assert_close(again, embeddings)


def test_latent_queries_pack_latent_slots_by_hand() -> None:
    features = torch.arange(8.0).view(2, 4, 1)
    labels = torch.tensor([[0, 5, 1, 6], [5, 2, -1, -1]])
    is_latent = torch.tensor([[False, True, False, True], [True, False, False, False]])
    packed, packed_labels, valid = latent_queries(features, labels, is_latent)
    assert packed[..., 0].tolist() == [[1.0, 3.0], [4.0, 5.0]] and valid.tolist() == [[True, True], [True, False]]
    assert packed_labels[0].tolist() == [5, 6] and packed_labels[1, 0] == 5


@pytest.mark.parametrize("generator", ["prototypes", "cls_tokens", "prototypes_mlp", "cls_tokens_mlp"])
def test_table_viii_generators(make_cfg, generator: str) -> None:
    model = build_run(make_cfg([*C2S, f"method.latent_generator={generator}", "+method.lr_multipliers.latent_decoder=10.0"]))["model"]
    # the recipe's x10 on the latent decoder is dropped where there is no decoder to speed up
    assert ("latent_decoder" in model.lr_multipliers) == generator.endswith("_mlp")
    num_seen = len(model.train_text_embeddings)
    regions, local, present, cls = _regions(model, num_seen)
    embeddings, _ = model._latent_embeddings(local, regions, present, cls, num_seen)
    source = local if generator.startswith("prototypes") else regions.tokens
    if not generator.endswith("_mlp"):  # used as they are: image 0's latent classes 0, 1 = slots 1, 2
        torch.testing.assert_close(embeddings[0], source[0, 1:3])
        torch.testing.assert_close(embeddings[1, 0], source[1, 1])
    else:
        torch.testing.assert_close(embeddings[0], model.latent_decoder(source[0, 1:3]))


@pytest.mark.parametrize("keys,latent", [("[]", False), ("[global]", True), ("[local]", True)])
def test_table_vii_decoder_keys(make_cfg, keys: str, latent: bool) -> None:
    objects = build_run(make_cfg([*C2S, f"method.decoder_keys={keys}"]))
    model = objects["model"]
    assert model.latent_embedding == latent and hasattr(model, "latent_decoder") == latent
    if latent:  # the decoder sees only the chosen keys: changing the other kind leaves A'_u alone
        model.eval()
        num_seen = len(model.train_text_embeddings)
        regions, local, present, cls = _regions(model, num_seen)
        with torch.no_grad():
            before, _ = model._latent_embeddings(local, regions, present, cls, num_seen)
            if keys == "[global]":
                regions.tokens.add_(5.0)
            else:
                cls = cls + 5.0
            after, _ = model._latent_embeddings(local, regions, present, cls, num_seen)
        torch.testing.assert_close(after, before)


@pytest.mark.parametrize("loss", ["cosine", "l2", "froster"])
def test_table_vi_distillation_losses_run_and_train(make_cfg, loss: str) -> None:
    objects = build_run(make_cfg([*C2S, f"method.distillation_loss={loss}"]))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    losses = model.training_losses(next(iter(datamodule.train_dataloader())))
    assert torch.isfinite(losses["global"]) and torch.isfinite(losses["local"]) and losses["global"] > 0
    losses["loss"].backward()
    if loss == "froster":
        assert model.froster_projector[0].weight.grad is not None


def test_regression_losses_by_hand(make_cfg) -> None:
    model = build_run(make_cfg(C2S))["model"]
    q, t = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 5.0], [2.0, 0.0]])
    used = torch.tensor([True, True])
    model.distillation_loss = "cosine"
    torch.testing.assert_close(model._regression(q, t, used), torch.tensor((1 - 0.8 + 0.0) / 2))
    model.distillation_loss = "l2"
    torch.testing.assert_close(model._regression(q, t, used), torch.tensor((9 + 1 + 1 + 0) / 2))


@pytest.mark.parametrize("size,expected", [("16", 16), ("null", 32)])
def test_region_passes_see_masked_images_at_region_image_size(make_cfg, size: str, expected: int) -> None:
    """``method.region_image_size``: Eq. 3's masked images enter the teacher with this longer side (the global
    and dense pass keeps the image's own size); ``null`` = the image's resolution (32-px scenes here)."""
    objects = build_run(make_cfg([*C2S, "clip=tiny_random", f"method.region_image_size={size}"]))
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    sizes: list[tuple[int, int]] = []
    original = model.teacher.encode_image
    model.teacher.encode_image = lambda images, *a, **k: sizes.append(tuple(images.shape[-2:])) or original(images, *a, **k)
    model.training_losses(batch)
    assert sizes[0] == tuple(batch["image"].shape[-2:])  # the global + dense pass
    assert len(sizes) > 1 and all(s == (expected, expected) for s in sizes[1:])


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("c2s", "+method.pseudo_masks.iteration=5", r"method.pseudo_masks.iteration: not an option of generate_pseudo_masks \(did you mean 'iterations'\?\)"),
        ("c2s", "+method.pseudo_masks.panoptic_cut.tua=0.2", r"method.pseudo_masks.panoptic_cut.tua: not an option of panoptic_cut_pseudo_masks \(did you mean 'tau'\?\)"),
        ("c2s", "+method.pseudo_masks.mask_proposal.scores=1", r"method.pseudo_masks.mask_proposal.scores: not an option of proposal_pseudo_masks"),
        ("chimera", "+method.pseudo_masks.thresold=0.5", r"method.pseudo_masks.thresold: not an option of generate_pseudo_masks \(did you mean 'threshold'\?\)"),
    ],
)
def test_a_misspelt_pseudo_mask_option_stops_at_construction_naming_its_key(make_cfg, method: str, override: str, message: str) -> None:
    # before, the dict reached the generator as keyword arguments and the first training step raised a TypeError
    with pytest.raises(ValueError, match=message):
        build_run(make_cfg([f"method={method}", override]), with_callbacks=False)


def test_every_documented_pseudo_mask_option_is_accepted(make_cfg) -> None:
    overrides = ["method=c2s", "+method.pseudo_masks.mask_proposal.query_chunk=8", "method.pseudo_masks.panoptic_cut.tau=0.2"]
    model = build_run(make_cfg(overrides), with_callbacks=False)["model"]
    assert model.proposal_options["query_chunk"] == 8 and model.panoptic_cut_options["tau"] == 0.2
