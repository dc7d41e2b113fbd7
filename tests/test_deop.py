"""DeOP (method=deop): GPS with α = 0 is the unmodified teacher, α = 1 severs the tokens of its block and equals a
hand computation of E·V, MPS (Eq. 1) against a hand computation, the heatmap output layer (Eq. 3) and the pooling
against plain loops, only prompts / CAL / proposals get gradients while the teacher stays bitwise unchanged,
training and evaluation through the CLI (joint and frozen proposals), the recipes and the ablation sweeps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from zeroseg.build import build_run
from zeroseg.clip.teacher import severed_block_forward, visual_forward
from zeroseg.models.anchor_decoders import QueryHeatmapDecoder, heatmap_pooling

from conftest import PROPOSALS_TINY, TINY_OVERRIDES, compose_sweep_jobs

DEOP = "zeroseg.methods.DeOP"
# the tiny world without the dense head's key; a narrow proposal stack on 64-px scenes, the toy CLIP
TINY = [o for o in TINY_OVERRIDES if not o.startswith("method")] + [
    "method=deop",
    "clip=toy",
    *PROPOSALS_TINY,
    "method.cal.ffn_dim=64",
    "dataset.train_dataset.scene.image_size=64",
]


def _visual(tiny_teacher):
    return tiny_teacher.model.visual


def _pixels(tiny_teacher, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return tiny_teacher.normalize(torch.rand(2, 3, size, size, generator=generator))


# -- patch severance (Sec. 4.1) -----------------------------------------------------------------------------


def test_gps_alpha_zero_equals_the_unmodified_teacher(tiny_teacher) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cls_reference, dense_reference = tiny_teacher.encode_image(images)
    # α = 0 in every block, through the teacher's own method
    cls, dense = tiny_teacher.encode_image_severed(images, severance={0: 0.0, -1: 0.0})
    assert torch.allclose(cls, cls_reference, atol=1e-5) and torch.allclose(dense, dense_reference, atol=1e-5)
    # the severed block itself at α = 0 (its own attention path) against open_clip's block forward
    block = _visual(tiny_teacher).transformer.resblocks[-1]
    tokens = torch.randn(2, 17, _visual(tiny_teacher).transformer.width, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(severed_block_forward(block, tokens, 0.0), block(tokens), atol=1e-5)


def test_gps_alpha_one_leaves_each_token_independent_of_the_others(tiny_teacher) -> None:
    block = _visual(tiny_teacher).transformer.resblocks[0]
    tokens = torch.randn(1, 17, _visual(tiny_teacher).transformer.width, generator=torch.Generator().manual_seed(2))
    perturbed = tokens.clone()
    perturbed[0, 5] += torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(3))
    others = [i for i in range(17) if i != 5]
    severed, severed_perturbed = severed_block_forward(block, tokens, 1.0), severed_block_forward(block, perturbed, 1.0)
    assert torch.equal(severed[0, others], severed_perturbed[0, others])
    assert not torch.allclose(severed[0, 5], severed_perturbed[0, 5])
    # with α < 1 the perturbation reaches the other tokens (the check can see mixing)
    half, half_perturbed = severed_block_forward(block, tokens, 0.5), severed_block_forward(block, perturbed, 0.5)
    assert (half[0, others] - half_perturbed[0, others]).abs().max() > 1e-4


def test_gps_alpha_one_on_the_last_block_equals_a_hand_computation(tiny_teacher) -> None:
    visual = _visual(tiny_teacher)
    pixels = _pixels(tiny_teacher)
    _, dense = visual_forward(visual, pixels, severance={-1: 1.0})
    # by hand: embed, run every block but the last as open_clip does, then E·V: x + W_o(W_v·ln_1(x)) + MLP
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    width = x.shape[-1]
    value_weight, value_bias = last.attn.in_proj_weight[2 * width :], last.attn.in_proj_bias[2 * width :]
    x = x + last.attn.out_proj(last.ln_1(x) @ value_weight.t() + value_bias)
    x = x + last.mlp(last.ln_2(x))
    expected = (visual.ln_post(x)[:, 1:] @ visual.proj).transpose(1, 2).reshape(2, -1, 4, 4)
    assert torch.allclose(dense, expected, atol=1e-5)


def test_mps_against_a_hand_computation_of_eq_1(tiny_teacher) -> None:
    visual = _visual(tiny_teacher)
    pixels = _pixels(tiny_teacher, seed=4)
    masks = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))  # on the 4x4 token grid already
    _, dense = visual_forward(visual, pixels, mps_layers=[-1], mps_masks=masks)
    x = visual.ln_pre(
        torch.cat([visual.class_embedding.expand(2, 1, -1), visual.conv1(pixels).flatten(2).transpose(1, 2)], dim=1)
        + visual.positional_embedding
    )
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    width, heads = x.shape[-1], last.attn.num_heads
    head_dim = width // heads
    values = last.ln_1(x) @ last.attn.in_proj_weight[2 * width :].t() + last.attn.in_proj_bias[2 * width :]
    mixed = torch.zeros_like(values)
    for b in range(2):
        # token masks: CLS is in every proposal, then the 16 patches (row-major)
        token_masks = [[1.0] + masks[b, j].flatten().tolist() for j in range(3)]
        for i in range(17):
            # Eq. 1: M_i = sum_j M_{j,i} * M_j, then the softmax over tokens
            logits = [sum(token_masks[j][i] * token_masks[j][k] for j in range(3)) for k in range(17)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            for k in range(17):
                mixed[b, i] += weights[k] / total * values[b, k]  # the same map for every head
    x = x + last.attn.out_proj(mixed)
    x = x + last.mlp(last.ln_2(x))
    expected = (visual.ln_post(x)[:, 1:] @ visual.proj).transpose(1, 2).reshape(2, -1, 4, 4)
    assert head_dim * heads == width
    assert torch.allclose(dense, expected, atol=1e-5)


# -- classification anchor learning (Sec. 4.2) ------------------------------------------------------------------


def test_heatmap_output_layer_and_pooling_against_plain_loops() -> None:
    generator = torch.Generator().manual_seed(6)
    decoder = QueryHeatmapDecoder(dim=8, num_queries=3, layers=1, heads=2, ffn_dim=16)
    queries = torch.randn(2, 3, 8, generator=generator)
    features = torch.randn(2, 8, 2, 3, generator=generator)
    masks = torch.rand(2, 3, 2, 3, generator=generator)
    heatmaps = decoder.heatmap_output(queries, features, masks)
    pooled = heatmap_pooling(heatmaps, features)
    for b in range(2):
        for n in range(3):
            # Eq. 3: H = softmax(q . F_V / sqrt(d)) * M, over the 6 positions
            scores = [float(queries[b, n] @ features[b, :, p // 3, p % 3]) / math.sqrt(8) for p in range(6)]
            top = max(scores)
            total = sum(math.exp(s - top) for s in scores)
            for p in range(6):
                expected = math.exp(scores[p] - top) / total * float(masks[b, n, p // 3, p % 3])
                assert abs(float(heatmaps[b, n, p]) - expected) < 1e-6
            # F_I = H (.) F_V: the heatmap-weighted sum of the feature vectors
            expected_pooled = sum(heatmaps[b, n, p] * features[b, :, p // 3, p % 3] for p in range(6))
            assert torch.allclose(pooled[b, n], expected_pooled, atol=1e-6)
    # the whole decoder gives one heatmap per proposal, zero outside its mask
    masks[:, :, 0, 0] = 0.0
    full = decoder(features, masks)
    assert full.shape == (2, 3, 6) and bool((full[..., 0] == 0).all())


# -- what trains -------------------------------------------------------------------------------------------------


def test_only_prompts_cal_and_proposals_get_gradients_and_the_teacher_never_changes(make_cfg) -> None:
    objects = build_run(make_cfg([*TINY, "method.visual_prompts.position_layers=[0,1]"], tiny=False), with_callbacks=False)
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    teacher_before = {name: tensor.clone() for name, tensor in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW([p for group in model.parameter_groups() for p in group["params"]], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.training_losses(batch)["loss"].backward()
        with_gradient = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        assert with_gradient == {"visual_prompts", "text_prompts", "cal", "no_object_embedding", "segmenter", "backbone"}
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
    assert all(torch.equal(tensor, teacher_before[name]) for name, tensor in model.teacher.state_dict().items())
    assert float(model.visual_prompts.patch_prompts.detach().abs().sum()) > 0  # the prompts moved


# -- through the CLI ----------------------------------------------------------------------------------------------


def _train(make_cfg, overrides, subdir):
    from zeroseg.train import train

    cfg = make_cfg(overrides, tiny=False, subdir=subdir)
    metrics, objects = train(cfg)
    return cfg, metrics, objects


def test_deop_trains_and_evaluates_with_joint_and_with_frozen_proposals(make_cfg) -> None:
    cfg, metrics, objects = _train(make_cfg, [*TINY, "test_checkpoint=last"], "joint")
    assert objects["trainer"].global_step == 4 and math.isfinite(metrics["train/loss"]) and 0 <= metrics["hIoU"] <= 100
    # a joint run's proposal stream (sizes under method.proposals) loads as frozen proposals for a later run
    from zeroseg.models.proposals import load_proposal_model

    joint = load_proposal_model(str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = objects["model"].eval().proposal_predictions(images)[-1].mask_logits
    torch.testing.assert_close(joint(images)[-1].mask_logits, expected)
    # frozen proposals from a query_baseline run (its masks; its class head is not used)
    query = [o for o in TINY if not o.startswith("method")] + [
        "method=query_baseline", *[o.replace("method.proposals.", "method.") for o in PROPOSALS_TINY], "trainer.max_steps=2", "test=false"
    ]
    query_cfg, _, _ = _train(make_cfg, query, "query")
    ckpt = Path(query_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    frozen = [*TINY, f"method.proposals.ckpt_path={ckpt}", "trainer.max_steps=2"]
    _, metrics, objects = _train(make_cfg, frozen, "frozen")
    model = objects["model"]
    assert model.proposal_model is not None and not any(p.requires_grad for p in model.proposal_model.parameters())
    assert math.isfinite(metrics["train/loss"]) and "proposal_mask" not in model.last_loss_terms


def test_proposals_of_another_architecture_stop_with_an_error_naming_both(make_cfg) -> None:
    cfg, _, _ = _train(make_cfg, [*TINY_OVERRIDES, "trainer.max_steps=1", "test=false"], "baseline")
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="Baseline.*query"):
        build_run(make_cfg([*TINY, f"method.proposals.ckpt_path={ckpt}"], tiny=False, subdir="bad"), with_callbacks=False)


# -- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps", [("voc", 20000), ("coco_stuff", 60000)])
def test_recipes_compose(make_cfg, name: str, steps: int) -> None:
    cfg = make_cfg([f"experiment=deop_{name}_resnet101c"], tiny=False)
    assert cfg.method._target_ == DEOP and cfg.backbone.model_name == "resnet101c" and cfg.clip.arch == "ViT-B-16"
    assert cfg.dataset.batch_size == 32 and cfg.trainer.max_steps == steps
    assert cfg.method.proposals.segmenter.num_queries == 100 and cfg.method.proposals.segmenter.class_head == "none"
    assert list(cfg.method.severance.gps_alphas) == [0.0, 1.0] and cfg.method.cal.layers == 1
    assert cfg.method.visual_prompts.mode == "adding" and cfg.method.text_prompts.trainable


SWEEPS = {"deop_ablation_gps": 6, "deop_ablation_cal": 5}
ROW_SWEEPS = {"deop_ablation_components": ("deop_table_3", 5), "deop_ablation_prompts": ("deop_table_7", 5)}


@pytest.mark.parametrize("experiment", sorted(SWEEPS))
@pytest.mark.parametrize("world", [(), ("+world=toy",)])
def test_value_sweeps_compose_in_the_ablation_setting(experiment: str, world) -> None:
    jobs = compose_sweep_jobs(experiment, extra=world)  # checks each swept value in the composed config
    assert len(jobs) == SWEEPS[experiment]
    labels = {"".join(k.split()).lower() for k in jobs[0][1].sweep_table.rows}  # collect_sweep ignores spaces
    for overrides, cfg in jobs:
        assert cfg.method._target_ == DEOP and "".join(overrides[0].split()).lower() in labels
        assert cfg.clip.arch == ("toy" if world else "ViT-B-16") and cfg.trainer.max_steps == (300 if world else 60000)


@pytest.mark.parametrize("experiment", sorted(ROW_SWEEPS))
def test_row_sweeps_compose_every_row_on_the_toy_proxy(experiment: str) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    folder, count = ROW_SWEEPS[experiment]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        base = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        ((key, values),) = OmegaConf.to_container(base.hydra.sweeper.params).items()
        rows = values.split(",")
        assert len(rows) == count and all(f"{key}={row}" in base.sweep_table.rows for row in rows)
        for row in rows:
            cfg = compose("train", overrides=[f"experiment={experiment}", f"{key}={row}", "+world=toy"])
            assert cfg.clip.arch == "toy" and cfg.method._target_ == DEOP, row
    GlobalHydra.instance().clear()


def test_learnt_text_embeddings_are_computed_once_outside_training(make_cfg) -> None:
    """Evaluation reuses the learnt-context text embeddings (the text tower over every class name per image
    would dominate inference); training, or a step back into train mode, computes them afresh."""
    model = build_run(make_cfg(TINY, tiny=False), with_callbacks=False)["model"]
    calls = []
    original = model.text_prompts.forward
    model.text_prompts.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    images = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        first = model.segment(images)
        second = model.segment(images)
    assert len(calls) == 1 and torch.equal(first, second)
    model.train()
    model.eval()
    with torch.no_grad():
        model.segment(images)
    assert len(calls) == 2


def test_predict_classifies_with_the_learnt_text_context(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """``zeroseg.predict`` on a DeOP checkpoint classifies arbitrary names through the checkpoint's learnt
    CoOp context, as the method's own evaluation does, not through the teacher's template prompts (what
    predict used before)."""
    import numpy as np
    from PIL import Image

    import zeroseg.predict as predict_module

    from conftest import compose_test_config

    cfg, _, objects = _train(make_cfg, [*TINY, "test=false"], "predict")
    # four steps barely move the context from its template initialisation: move it, as longer training does
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    context = checkpoint["state_dict"]["text_prompts.context"]
    moved = context + torch.randn(context.shape, generator=torch.Generator().manual_seed(1))
    checkpoint["state_dict"]["text_prompts.context"] = moved
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    scene = objects["datamodule"].datasets["val"][0]["image"]
    Image.fromarray((scene.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(tmp_path / "scene.png")
    names = ["red stripes", "cyan grid", "pink dots"]  # seen, unseen, and a name from nowhere
    used = []
    original = predict_module.open_vocabulary_logits
    monkeypatch.setattr(predict_module, "open_vocabulary_logits", lambda m, x, e: used.append(e) or original(m, x, e))
    predict_cfg = compose_test_config(
        tmp_path / "predict",
        [f"ckpt_path={tmp_path / 'moved.ckpt'}", f"inputs={tmp_path / 'scene.png'}", f'classes="{",".join(names)}"',
         *[o for o in TINY if o.startswith(("method", "clip", "backbone"))]],
        config_name="predict", tiny=False,
    )  # fmt: skip
    _, predicted = predict_module.predict(predict_cfg)
    model = predicted["model"]
    np.testing.assert_array_equal(model.text_prompts.context.detach().numpy(), moved.numpy())  # the checkpoint's
    # independently: the CoOp learner with the moved context over these names
    with torch.no_grad():
        learnt = model.text_prompts(model.teacher, names)
    assert len(used) == 1
    torch.testing.assert_close(used[0], learnt)
    assert not torch.allclose(learnt, model.teacher.encode_text(names), atol=1e-2)
