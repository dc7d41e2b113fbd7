"""Chimera-Seg: CSH against a plain computation, gradients, ablation switches, K schedule (also after
resume), SGD and SAM against hand computations, γ only on unseen classes at evaluation."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F
from omegaconf import open_dict

from zeroseg.build import build_run
from zeroseg.methods.chimera import scheduled_top_k, selective_global_feature, semantic_alignment_loss
from zeroseg.train import train

from conftest import compose_sweep_jobs

# 32-px test scenes give a 4x4 teacher grid: windows must fit it
CHIMERA = ["method=chimera", "method.pseudo_masks.window_sizes=[1,3]"]


def _batch(datamodule) -> dict:
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_csh_equals_a_plain_computation_with_the_teachers_weights(make_cfg) -> None:
    objects = build_run(make_cfg(CHIMERA))
    model, teacher = objects["model"], objects["teacher"]
    model.eval()
    head = model.head
    visual = teacher.model.visual
    block = visual.transformer.resblocks[-1]
    width = visual.transformer.width
    features = model.backbone(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        f_p = head.mlp(features)  # (B, W, h, w)
        x = f_p.permute(0, 2, 3, 1).float()
        w_v, b_v = block.attn.in_proj_weight[2 * width :].float(), block.attn.in_proj_bias[2 * width :].float()
        value = F.linear(F.layer_norm(x, (width,), block.ln_1.weight.float(), block.ln_1.bias.float()), w_v, b_v)
        x = x + F.linear(value, block.attn.out_proj.weight.float(), block.attn.out_proj.bias.float())
        hidden = F.layer_norm(x, (width,), block.ln_2.weight.float(), block.ln_2.bias.float())
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(hidden.to(block.mlp.c_fc.weight.dtype)))).float()
        bn = head.norm
        normed = (x.permute(0, 3, 1, 2) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bn.running_var.view(1, -1, 1, 1) + bn.eps
        )
        normed = normed * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        expected = torch.einsum("bwhv,wd->bdhv", f_p + normed, visual.proj.float())
        torch.testing.assert_close(head(features), expected, rtol=1e-4, atol=1e-4)


def test_default_gradients_reach_backbone_mlp_and_norm_only_and_copied_weights_stay(make_cfg) -> None:
    objects = build_run(make_cfg(CHIMERA))
    model = objects["model"]
    frozen_before = {n: p.detach().clone() for n, p in model.head.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vencoder.") for n in frozen_before) and "proj" in frozen_before
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(objects["datamodule"])
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        losses = model.training_losses(batch)
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n.split(".")[0] for n in with_grad} == {"backbone", "head"}
    head_parts = {n.split(".")[1] for n in with_grad if n.startswith("head.")}
    assert head_parts == {"mlp", "norm"}
    assert not any(n.startswith("teacher.") for n, p in model.named_parameters() if p.requires_grad)
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.head.named_parameters())[name], before), name
    # the CSH's frozen copies are part of the checkpointed model, the teacher is not
    state = model.state_dict()
    assert "head.proj" in state and any(k.startswith("head.vencoder.0.v_proj") for k in state)


@pytest.mark.parametrize(
    "switch",
    [
        "method.csh=false",
        "method.csh_options.blocks=0",
        "method.csh_options.blocks=2",
        "method.csh_options.value=false",
        "method.csh_options.ffn=false",
        "method.csh_options.freeze_vencoder=false",
        "method.csh_options.freeze_vencoder=value",
        "method.csh_options.norm=gn",
        "method.csh_options.norm=ln_clip",
        "method.csh_options.norm=ln",
        "method.csh_options.norm=none",
        "method.csh_options.residual=false",
        "method.csh_options.projection=learnable",
        "method.csh_options.projection=scratch",
        "method.sgd=false",
        "method.gumbel=false",
        "method.sam=false",
    ],
)
def test_every_ablation_switch_builds_and_runs(make_cfg, switch: str) -> None:
    objects = build_run(make_cfg([*CHIMERA, switch]))
    model = objects["model"]
    losses = model.training_losses(_batch(objects["datamodule"]))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")}
    if switch.endswith("freeze_vencoder=false"):
        assert "vencoder" in trainable
    if switch.endswith("freeze_vencoder=value"):  # Table VII: FFN learns, the value path stays CLIP's
        learns = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.vencoder.")}
        assert learns == {"ln_2", "mlp"}, learns
    if switch.endswith(("projection=learnable", "projection=scratch")):
        assert "proj" in trainable
    if switch.endswith("norm=ln_clip"):
        assert "norm" not in trainable
    if switch == "method.sam=false":
        assert "sam" not in losses


def test_scratch_projection_has_he_initialisation(make_cfg) -> None:
    # Table V's "He [83]" row: std sqrt(2 / fan_in), fan_in = the toy CLIP's visual width 128 -> 0.125
    # (CLIP's own width^-0.5 scale would be 0.088)
    torch.manual_seed(0)
    proj = build_run(make_cfg([*CHIMERA, "method.csh_options.projection=scratch"]))["model"].head.proj
    assert proj.shape[0] == 128 and abs(float(proj.std()) - math.sqrt(2 / 128)) < 0.005


def test_unknown_csh_options_are_rejected(make_cfg) -> None:
    with pytest.raises(ValueError, match=r"method.csh.norm='batch' is not one of"):
        build_run(make_cfg([*CHIMERA, "method.csh_options.norm=batch"]))
    with pytest.raises(ValueError, match=r"method.csh.blocks=9 must be between 0 and the teacher's 4 visual blocks"):
        build_run(make_cfg([*CHIMERA, "method.csh_options.blocks=9"]))


@pytest.mark.parametrize(
    "rate,expected", [(-0.1, [9000, 9000, 8999, 8990, 8900, 1]), (0.0, [9000] * 6), (0.1, [9000, 9000, 9001, 9010, 9100, 10000])]
)
def test_top_k_schedule_on_the_papers_map(rate: float, expected: list[int]) -> None:
    # SegFormer's 128x128 map at 512^2: scaling by H*W / 16384 is the identity, K is the paper's count
    steps = [0, 4, 6, 100, 1000, 1_000_000]
    assert [scheduled_top_k(s, 9000, rate, 10000) for s in steps] == expected
    assert [scheduled_top_k(s, 9000, rate, 16384, 16384) for s in steps[:5]] == expected[:5]
    assert scheduled_top_k(5, 9000, -0.1, 10000) == 9000  # round half to even: 8999.5 -> 9000


def test_top_k_is_the_papers_fraction_of_a_smaller_map() -> None:
    # hand: 9000 / 16384 of a 16x16 map = 140.6 -> 141; after 80k steps (9000 - 8000) / 16384 * 256 = 15.6 -> 16
    assert scheduled_top_k(0, 9000, -0.1, 256, 16384) == 141
    assert scheduled_top_k(80_000, 9000, -0.1, 256, 16384) == 16
    # a ViT-B/16 student's 32x32 map at 512^2: 562.5 -> 562 (half to even), then 62.5 -> 62
    assert scheduled_top_k(0, 9000, -0.1, 1024, 16384) == 562 and scheduled_top_k(80_000, 9000, -0.1, 1024, 16384) == 62
    # a 300-step proxy read over the paper's 80k budget ends where the paper ends
    assert scheduled_top_k(300, 9000, -0.1, 256, 16384, step_scale=80_000 / 300) == 16
    # literal counts (top_k_positions: null) on a small map: every position, i.e. no selection
    assert scheduled_top_k(0, 9000, -0.1, 256) == 256


def test_sgd_selects_in_the_toy_world_and_logs_k_and_hw(make_cfg) -> None:
    # the toy defaults (ResNet-18, 64-px scenes, a 16x16 map), one step: K must be below H*W
    objects = build_run(make_cfg(["method=chimera"], tiny=False))
    model = objects["model"]
    losses = model.training_losses(_batch(objects["datamodule"]))
    assert losses["positions"] == 256 and losses["top_k"] == 141  # round(9000 / 16384 * 256)


def test_top_k_follows_the_optimizer_step_across_resume(make_cfg) -> None:
    overrides = [*CHIMERA, "method.top_k_start=200", "method.top_k_rate=-10", "method.top_k_positions=null", "trainer.max_steps=3", "test=false"]
    _, objects = train(make_cfg(overrides, subdir="first"))
    model = objects["model"]
    assert model.global_step == 3 and model.current_top_k(10_000) == 170
    last = Path(objects["trainer"].checkpoint_callback.dirpath) / "last.ckpt"
    resumed_cfg = make_cfg([*overrides[:-2], "trainer.max_steps=5", "test=false", f"ckpt_path={last}"], subdir="resumed")
    _, resumed = train(resumed_cfg)
    assert resumed["model"].global_step == 5 and resumed["model"].current_top_k(10_000) == 150


def test_selection_with_zero_noise_is_the_true_top_k_and_pooling_by_hand() -> None:
    torch.manual_seed(0)
    features, cls = torch.randn(2, 8, 30), torch.randn(2, 8)
    pooled = selective_global_feature(features, cls, 5, 0.07, torch.zeros(2, 30))
    for b in range(2):
        scores = cls[b] @ features[b] / math.sqrt(8)
        top = scores.topk(5).indices
        weights = torch.softmax(scores[top], dim=0)
        torch.testing.assert_close(pooled[b], features[b][:, top] @ weights)
    # with all positions and no noise it is CLIP-to-Seg's attention pooling
    from zeroseg.toolkit.dense import attention_pooled_feature

    torch.testing.assert_close(
        selective_global_feature(features, cls, 30, 0.07, torch.zeros(2, 30)), attention_pooled_feature(features, cls)
    )


def test_gumbel_noise_selects_the_top_k_of_the_perturbed_scores_and_varies_the_selection() -> None:
    torch.manual_seed(1)
    features, cls = torch.randn(1, 8, 30), torch.randn(1, 8)
    scores = cls[0] @ features[0] / math.sqrt(8)
    noise = torch.zeros(1, 30)
    true_top = set(scores.topk(5).indices.tolist())
    outside = next(i for i in range(30) if i not in true_top)
    noise[0, outside] = 100.0  # hand-made noise that lifts one low-score position into the top 5
    picked = scores.topk(5).indices.tolist()[:4] + [outside]
    expected = features[0][:, picked] @ torch.softmax(scores[picked], dim=0)
    torch.testing.assert_close(selective_global_feature(features, cls, 5, 0.07, noise)[0], expected)
    # drawn noise: some draws pick another set than the noiseless top-K (never with the noise off)
    deterministic = selective_global_feature(features, cls, 5, 0.07, torch.zeros(1, 30))
    draws = [selective_global_feature(features, cls, 5, 0.07) for _ in range(20)]
    assert any(not torch.allclose(d, deterministic) for d in draws)


@pytest.mark.parametrize("gumbel", [True, False])
def test_the_method_draws_gumbel_noise_only_when_switched_on(make_cfg, monkeypatch, gumbel: bool) -> None:
    from zeroseg.methods import chimera

    seen = []
    original = chimera.selective_global_feature
    monkeypatch.setattr(chimera, "selective_global_feature", lambda *a: seen.append(a) or original(*a))
    objects = build_run(make_cfg([*CHIMERA, f"method.gumbel={str(gumbel).lower()}"]))
    objects["model"].training_losses(_batch(objects["datamodule"]))
    (args,) = seen
    assert (args[-1] is None) == gumbel  # None = draw the noise inside; zeros = no noise
    assert args[2] < args[0].shape[-1]  # and K selects: fewer than H*W positions


def test_sgd_info_nce_by_hand() -> None:
    from zeroseg.toolkit.losses import info_nce

    pooled, cls = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = F.normalize(pooled, dim=-1) @ F.normalize(cls, dim=-1).t() / 0.07
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 1]) / 2
    torch.testing.assert_close(info_nce(pooled, cls, torch.arange(2), 0.07), expected)


def test_sam_kl_by_hand() -> None:
    text = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]]), dim=-1)
    cls = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    prototypes = torch.tensor(
        [[[2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [5.0, 5.0, 5.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    )
    classes = torch.tensor([[0, 2, 7], [1, -1, -1]])
    present = torch.tensor(
        [[True, True, False], [True, False, False]]
    )  # image 0: seen 0 and 2; a latent region; image 1: one class
    loss = semantic_alignment_loss(prototypes, classes, present, text, cls, 0.07, 0.01)
    c = F.normalize(cls[0], dim=0)
    p = torch.softmax(torch.stack([F.normalize(prototypes[0, i], dim=0) @ c for i in (0, 1)]) / 0.07, 0)
    q = torch.softmax(torch.stack([text[i] @ c for i in (0, 2)]) / 0.01, 0)
    kl_image0 = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(loss, (kl_image0 + 0.0) / 2)  # image 1 has one class: KL 0
    # no NaN gradients from masked entries
    prototypes.requires_grad_(True)
    semantic_alignment_loss(prototypes, classes, present, text, cls, 0.07, 0.01).backward()
    assert torch.isfinite(prototypes.grad).all()


def test_gamma_touches_only_unseen_logits_and_only_at_evaluation(make_cfg) -> None:
    objects = build_run(make_cfg([*CHIMERA, "method.gamma=0.5"]))
    model = objects["model"]
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        raw = model.resize_to(model.predict_logits(images, model.class_text_embeddings), (32, 32))
        calibrated = model(images)
    difference = calibrated - raw
    unseen = torch.tensor(model.unseen_class_ids)
    seen = torch.tensor(model.split.seen_class_ids)
    torch.testing.assert_close(difference[:, unseen], torch.full_like(difference[:, unseen], 0.5))
    assert bool((difference[:, seen] == 0).all())
    # training never sees gamma: its logits are over the training classes only, without calibration
    batch = _batch(objects["datamodule"])
    torch.manual_seed(0)
    with_gamma = model.training_losses(batch)["loss"]
    model.gamma = 0.0
    torch.manual_seed(0)
    torch.testing.assert_close(model.training_losses(batch)["loss"], with_gamma)
    # transductive runs: no gamma unless configured
    transductive = build_run(make_cfg([*CHIMERA, "method.gamma=0.5", "dataset.setting=transductive"], subdir="t"))["model"]
    assert transductive.calibration == 0.0
    configured = [*CHIMERA, "method.gamma=0.5", "dataset.setting=transductive", "method.gamma_in_transductive=true"]
    assert build_run(make_cfg(configured, subdir="c"))["model"].calibration == 0.5


def test_headline_command_composes_and_runs_with_segformer_b4(make_cfg) -> None:
    cfg = make_cfg([*CHIMERA, "backbone=segformer_b4", "trainer.max_steps=1", "test=false"])
    with open_dict(cfg):
        cfg.trainer.val_check_interval = 1
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and math.isfinite(metrics["train/loss"])
    assert type(objects["model"].backbone).__name__ == "MixTransformer"


def test_gamma_sweep_composes_every_value() -> None:
    # the ablation sweeps are in test_sweeps.py; Fig. 10 is an evaluation sweep
    configs = compose_sweep_jobs("chimera_gamma", "eval")  # checks each swept gamma lands in its job
    assert sorted(cfg.method.gamma for _, cfg in configs) == [round(0.1 * i, 1) for i in range(11)]
    assert all(cfg.method._target_ == "zeroseg.methods.ChimeraSeg" for _, cfg in configs)


@pytest.mark.parametrize("experiment,steps", [("coco_stuff", 80000), ("context59", 40000)])
def test_chimera_paper_recipes(make_cfg, experiment: str, steps: int) -> None:
    cfg = make_cfg([f"experiment=chimera_{experiment}_segformer_b4"], tiny=False)
    assert cfg.method._target_ == "zeroseg.methods.ChimeraSeg" and cfg.backbone.variant == "b4"
    assert cfg.trainer.max_steps == steps and cfg.dataset.batch_size == 16 and cfg.clip.arch == "ViT-B-16"
    assert cfg.method.gamma == (0.5 if experiment == "coco_stuff" else 0.0)
    vit = make_cfg(["experiment=chimera_coco_stuff_vit_b16"], tiny=False, subdir="vit")
    assert vit.backbone._target_.endswith("TimmViTBackbone") and vit.method.gamma == 0.5 and vit.trainer.max_steps == 80000


def test_modules_sweep_runs_fast_dev_runs_and_collect_sweep_renders_table_iii(tmp_path: Path) -> None:
    from conftest import TINY_OVERRIDES, subprocess_env

    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("method=", "trainer.max_steps", "trainer.val_check"))]
    env = {**subprocess_env(), "ZEROSEG_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "zeroseg.train", "-m", "experiment=chimera_ablation_modules", "+world=toy", "debug=fdr",
         "method.pseudo_masks.window_sizes=[1,3]", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "logs/debug/multiruns").iterdir()  # debug=fdr runs under task_name debug
    assert len(list(sweep_dir.glob("*/metrics.json"))) == 4
    # the paper's baseline row is CLIP-to-Seg itself, not Chimera with its modules off
    targets = [yaml.safe_load((job / "config.yaml").read_text())["method"]["_target_"] for job in sorted(sweep_dir.glob("[0-9]*"))]
    assert targets == ["zeroseg.methods.CLIPToSeg"] + ["zeroseg.methods.ChimeraSeg"] * 3
    table = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "scripts/collect_sweep.py"), str(sweep_dir)],
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in lines[1:]]
    assert names == ["Baseline", "Baseline + CSH", "Baseline + CSH + SGD", "Baseline + CSH + SGD + SAM"]
    assert "Table III" in table.stdout and "toy-world proxy" in table.stdout


def test_collect_sweep_labels_rows_and_reports_missing_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    import yaml

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import collect_sweep

    rows = {"method.sam_weight=0.0": "without SAM", "method.sam_weight=0.5": "lambda 0.5"}
    for job, (weight, h) in enumerate([(0.5, 33.8), (0.0, 33.4), (1.0, None)]):
        job_dir = tmp_path / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(["experiment=x", f"method.sam_weight={weight}"]))
        (job_dir / "config.yaml").write_text(yaml.safe_dump({"sweep_table": {"title": "Table XII", "rows": rows}}))
        if h is not None:
            (job_dir / "metrics.json").write_text(json.dumps({"sIoU": 32.5, "uIoU": 35.2, "hIoU": h, "mIoU": 40.0}))
    assert collect_sweep.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[1:] == [
        "| without SAM | 32.5 | 35.2 | 33.4 | 40.0 |",
        "| lambda 0.5 | 32.5 | 35.2 | 33.8 | 40.0 |",
        "| method.sam_weight=1.0 | missing | missing | missing | missing |",
    ]
    assert "1 job(s) without metrics.json" in err
