"""CLIP-to-Seg Tables XII and XIII: the "Mask Proposal" generator on a hand-built proposal set, its wiring into
``method=c2s`` (and the error without a proposal checkpoint), the Table XII sweep in the paper setting and as a
toy proxy, and Table XIII's best-match IoU (scripts/measure_mask_iou.py) against a brute-force NumPy loop."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from test_sweeps import _check_swept_values, sweep_jobs
from zeroseg.models.query_decoders import QueryPrediction
from zeroseg.toolkit.pseudo_masks import proposal_pseudo_masks

from conftest import compose_test_config

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import measure_mask_iou  # noqa: E402

IGNORE = 255


def _proposal_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Four proposals on a 4x4 image, pixel (0, 0) and (3, 3) annotated with seen class 1."""
    low = -5.0
    logits = torch.full((1, 4, 4, 4), low)
    logits[0, 0, :2, :2] = 5.0  # P0: top-left block
    logits[0, 1, 0, 0] = 6.0  # P1: wins only the seen pixel (0, 0) -> keeps nothing, dropped
    logits[0, 2, :2, :] = 3.0  # P2: top half, loses the top-left block to P0
    logits[0, 3, 3, :] = 0.1  # P3: bottom row, sigmoid 0.52 > 0.5; row 2 stays unclaimed (all at -5)
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, 0, 0] = labels[0, 3, 3] = 1
    return logits, labels


@pytest.mark.parametrize("query_chunk", [1, 2, 3, 16])
def test_mask_proposal_generator_on_a_hand_built_proposal_set(query_chunk: int) -> None:
    logits, labels = _proposal_set()
    # the same hand-computed answers however the queries are chunked
    generate = functools.partial(proposal_pseudo_masks, query_chunk=query_chunk)
    out = generate(logits, labels, num_seen=2, ignore_index=IGNORE)
    # kept proposals P0, P2, P3 become latent classes 2, 3, 4 (in query order, P1 dropped); seen pixels stay
    expected = [[1, 2, 3, 3], [2, 2, 3, 3], [IGNORE, IGNORE, IGNORE, IGNORE], [4, 4, 4, 1]]
    assert out[0].tolist() == expected
    # min_area 4/16: P0 (3 pixels) and P3 (3 pixels) are dropped; P2 is the only latent class
    small = generate(logits, labels, num_seen=2, ignore_index=IGNORE, min_area=4 / 16)
    assert small[0].tolist() == [
        [1, IGNORE, 2, 2],
        [IGNORE, IGNORE, 2, 2],
        [IGNORE, IGNORE, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE, 1],
    ]
    # a low-confidence proposal takes no part: P2's pixels would go to the next proposal, all below 0.5
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.9]])
    scored = generate(logits, labels, num_seen=2, ignore_index=IGNORE, scores=scores, score_threshold=0.5)
    assert scored[0].tolist() == [[1, 2, IGNORE, IGNORE], [2, 2, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE, IGNORE], [3, 3, 3, 1]]
    # a stricter mask threshold removes the weak bottom row
    strict = generate(logits, labels, num_seen=2, ignore_index=IGNORE, mask_threshold=0.6)
    assert strict[0, 3].tolist() == [IGNORE, IGNORE, IGNORE, 1]


@pytest.mark.parametrize("query_chunk", [1, 2, 4])
def test_equal_mask_logits_go_to_the_earlier_proposal_across_chunks(query_chunk: int) -> None:
    logits = torch.full((1, 4, 2, 2), -5.0)
    logits[0, 1] = 2.0  # P1 and P3 tie everywhere: P1 (earlier) takes the image
    logits[0, 3] = 2.0
    logits[0, 2, 0, 0] = 3.0  # P2 beats both at (0, 0)
    labels = torch.full((1, 2, 2), IGNORE)
    out = proposal_pseudo_masks(logits, labels, num_seen=1, ignore_index=IGNORE, query_chunk=query_chunk)
    assert out[0].tolist() == [[2, 1], [1, 1]]  # kept P1 -> latent 1, P2 -> latent 2
    with pytest.raises(ValueError, match=r"query_chunk=0: expected a positive number"):
        proposal_pseudo_masks(logits, labels, num_seen=1, ignore_index=IGNORE, query_chunk=0)


class _FixedProposals(nn.Module):
    """Stands in for a loaded ProposalModel: the same mask logits for every image, no class head."""

    class_head = "none"

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor, class_embeddings=None) -> list[QueryPrediction]:
        return [QueryPrediction(None, self.logits.expand(len(images), -1, -1, -1))]


def test_c2s_mask_proposal_wiring_uses_the_proposal_model_masks(tmp_path: Path, monkeypatch) -> None:
    from zeroseg.build import build_run
    from zeroseg.methods import c2s

    logits, labels = _proposal_set()
    calls = {}

    def fake_loader(ckpt_path, key, produced_by):
        calls.update(ckpt_path=ckpt_path, key=key)
        return _FixedProposals(logits)

    monkeypatch.setattr(c2s, "load_proposal_model", fake_loader)
    cfg = compose_test_config(
        tmp_path,
        [
            "method=c2s",
            "method.pseudo_masks.generator=mask_proposal",
            "method.pseudo_masks.mask_proposal.ckpt_path=/some/query/last.ckpt",
        ],
    )
    model = build_run(cfg, with_callbacks=False)["model"]
    assert calls == {"ckpt_path": "/some/query/last.ckpt", "key": "method.pseudo_masks.mask_proposal.ckpt_path"}
    assert not any(k.startswith("_proposal") for k in model.state_dict())  # never checkpointed
    num_seen = len(model.train_text_embeddings)
    images = torch.rand(2, 3, 16, 16)
    big_labels = labels.repeat(2, 1, 1)
    dense = torch.randn(2, model.teacher.embed_dim, 4, 4)
    out = model.pseudo_masks(images, big_labels, dense)
    expected = proposal_pseudo_masks(logits.expand(2, -1, -1, -1), big_labels, num_seen, IGNORE)
    assert torch.equal(out, expected) and int(out[out != IGNORE].max()) == num_seen + 2


def test_c2s_mask_proposal_without_checkpoint_names_the_key_and_the_command(tmp_path: Path) -> None:
    from zeroseg.build import build_run

    cfg = compose_test_config(tmp_path, ["method=c2s", "method.pseudo_masks.generator=mask_proposal"])
    with pytest.raises(ValueError, match="method.pseudo_masks.mask_proposal.ckpt_path") as error:
        build_run(cfg, with_callbacks=False)
    assert "python -m zeroseg.train experiment=query_baseline_coco_stuff_resnet101" in str(error.value)
    cfg = compose_test_config(tmp_path, ["method=c2s", "method.pseudo_masks.generator=nope"])
    with pytest.raises(ValueError, match="generator='nope'"):
        build_run(cfg, with_callbacks=False)


def test_c2s_panoptic_cut_generator_trains_a_step(tmp_path: Path) -> None:
    from zeroseg.build import build_run

    cfg = compose_test_config(tmp_path, ["method=c2s", "method.pseudo_masks.generator=panoptic_cut", "method.head.width=16"])
    objects = build_run(cfg, with_callbacks=False)
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    _, dense = model.teacher.encode_image(batch["image"])
    pseudo = model.pseudo_masks(batch["image"], batch["label"], dense)
    seen = batch["label"] != IGNORE
    assert torch.equal(pseudo[seen], batch["label"][seen]) and bool((pseudo >= len(model.train_text_embeddings)).any())
    losses = model.training_losses(batch)
    assert torch.isfinite(losses["loss"])


ROWS = {"mask_proposal": "Mask Proposal", "panoptic_cut": "Panoptic cut", "kmeans": "Ours"}


@pytest.mark.parametrize("world", [(), ("+world=toy",)])
def test_table_xii_sweep_composes_in_the_paper_setting_and_as_a_toy_proxy(world: tuple[str, ...]) -> None:
    jobs = sweep_jobs("c2s_ablation_pseudo_masks", world)
    assert len(jobs) == 3
    cfg0 = jobs[0][2]
    assert "Table XII" in cfg0.sweep_table.title
    labels = {k.split("=", 1)[1]: v for k, v in cfg0.sweep_table.rows.items()}
    assert labels == ROWS
    for overrides, pairs, cfg in jobs:
        _check_swept_values(pairs, cfg)
        choices = cfg.hydra.runtime.choices
        assert cfg.method._target_ == "zeroseg.methods.CLIPToSeg"
        if world:
            assert (choices.dataset, choices.backbone, choices.clip) == ("synthetic", "resnet18", "toy")
            assert cfg.trainer.max_steps == 300 and cfg.world.proxy and "toy_proxy" in cfg.tags
        else:
            assert (choices.dataset, choices.backbone, choices.clip) == ("coco_stuff", "segformer_b4", "vit_b16")
            assert cfg.trainer.max_steps == 40000 and cfg.method.optimizer.lr == 6e-5
        assert cfg.method.pseudo_masks.mask_proposal.ckpt_path is None  # the user gives it (error names the command)


def _brute_force(generated: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    inter = np.zeros((len(target), num_classes))
    union = np.zeros((len(target), num_classes))
    for b in range(len(target)):
        labelled = target[b] != IGNORE
        masks = [generated[b] == v for v in sorted(set(generated[b][labelled].tolist()) - {IGNORE})]
        for c in range(num_classes):
            gt = (target[b] == c) & labelled
            if not gt.any():
                continue
            best_iou, best = 0.0, (0.0, float(gt.sum()))
            for mask in masks:
                mask = mask & labelled
                i, u = float((gt & mask).sum()), float((gt | mask).sum())
                if i / u > best_iou:
                    best_iou, best = i / u, (i, u)
            inter[b, c], union[b, c] = best
    return inter, union


def test_best_match_iou_against_a_brute_force_loop() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 12, 10))
    target[:, :3] = IGNORE  # unlabelled rows take no part
    target[2][target[2] == 4] = 0  # class 4 absent from image 2
    generated = rng.integers(0, 6, size=(3, 12, 10)) + 7
    generated[0, :, :5] = target[0, :, :5]  # image 0: some masks agree with the classes
    generated[1, 5:] = IGNORE  # uncovered pixels are no mask
    generated[2] = IGNORE  # image 2: nothing generated
    inter, union, present = measure_mask_iou.best_match_statistics(torch.tensor(generated), torch.tensor(target), 5, IGNORE)
    expected_inter, expected_union = _brute_force(generated, target, 5)
    np.testing.assert_allclose(inter.numpy(), expected_inter)
    np.testing.assert_allclose(union.numpy(), expected_union)
    assert present.numpy().tolist() == (expected_union > 0).tolist()


def test_summarize_means_over_present_unseen_seen_and_all_classes() -> None:
    intersection = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    union = torch.tensor([2.0, 4.0, 0.0, 4.0], dtype=torch.float64)  # class 2 never present
    matches = torch.tensor([0.5, 0.25, 0.0, 1.5], dtype=torch.float64)
    counts = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    result = measure_mask_iou.summarize(intersection, union, matches, counts, unseen_class_ids=[2, 3])
    assert result["mIoU_unseen"] == pytest.approx(75.0) and result["mIoU_seen"] == pytest.approx(50.0)
    assert result["mIoU_all"] == pytest.approx(100 * (0.5 + 0.5 + 0.75) / 3)
    assert result["match_mean_IoU_all"] == pytest.approx(100 * 2.25 / 4)
    assert (result["classes_unseen"], result["classes_seen"]) == (1, 2)
