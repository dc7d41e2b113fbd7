"""End-to-end: train → metrics.json → eval reproduces; exact resume; checkpoint hygiene; gradients."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from zeroseg.build import build_run
from zeroseg.eval import evaluate
from zeroseg.methods import CheckpointMismatchError
from zeroseg.metrics import SUMMARY_KEYS
from zeroseg.train import train


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def same_number(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-9))


def test_train_writes_outputs_and_eval_reproduces_the_test_metrics(make_cfg) -> None:
    cfg = make_cfg(subdir="train")
    metrics, objects = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "config.yaml").is_file()
    written = read_metrics(run_dir)
    assert set(SUMMARY_KEYS) <= set(written)
    assert list(written["per_class_iou"]) == list(cfg.dataset.split.class_names)
    assert objects["trainer"].global_step == 4
    best = Path(metrics["ckpt_path"])
    assert best.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert checkpoint["zeroseg"]["split"]["class_names"] == list(cfg.dataset.split.class_names)
    assert checkpoint["zeroseg"]["teacher"]["pretrained"].endswith("toy_clip.safetensors")
    assert any(k.startswith("backbone.") for k in checkpoint["state_dict"])

    eval_cfg = make_cfg([f"ckpt_path={best}"], config_name="eval", subdir="eval")
    eval_metrics, _ = evaluate(eval_cfg)
    reproduced = read_metrics(Path(eval_cfg.paths.output_dir))
    for key in SUMMARY_KEYS:
        assert same_number(reproduced[key], written[key]), key
        assert same_number(eval_metrics[key], metrics[key]), key
    assert all(same_number(reproduced["per_class_iou"][c], v) for c, v in written["per_class_iou"].items())


def _with_step_checkpoints(cfg, every: int) -> None:
    with open_dict(cfg):
        cfg.callbacks.step_checkpoint = {
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
            "dirpath": f"{cfg.paths.output_dir}/step_checkpoints",
            "filename": "step{step}",
            "every_n_train_steps": every,
            "save_top_k": -1,
            "monitor": None,
            "auto_insert_metric_name": False,
        }


def test_resume_mid_epoch_equals_uninterrupted_training(make_cfg) -> None:
    # 48 images / batch 8 = 6 steps per epoch: resuming at step 3 is mid-epoch, 9 steps cross an epoch
    overrides = ["trainer.max_steps=9", "trainer.val_check_interval=3"]
    full_cfg = make_cfg(overrides, subdir="full")
    _with_step_checkpoints(full_cfg, every=3)
    full_metrics, full_objects = train(full_cfg)
    step3 = Path(full_cfg.paths.output_dir) / "step_checkpoints" / "step3.ckpt"
    assert step3.is_file()

    resumed_cfg = make_cfg([*overrides, f"ckpt_path={step3}"], subdir="resumed")
    resumed_metrics, resumed_objects = train(resumed_cfg)
    assert resumed_objects["trainer"].global_step == 9
    full_state = torch.load(Path(full_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    resumed_state = torch.load(Path(resumed_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert full_state["global_step"] == resumed_state["global_step"] == 9
    for key, value in full_state["state_dict"].items():
        assert torch.equal(value, resumed_state["state_dict"][key]), key
    for key in SUMMARY_KEYS:
        assert same_number(full_metrics[key], resumed_metrics[key]), key
    # the checkpoint recorded the mid-epoch position of the data order
    assert full_state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_consumed"] == 3


def test_checkpoint_of_another_split_is_rejected(make_cfg) -> None:
    cfg = make_cfg(subdir="train")
    metrics, _ = train(cfg)
    other = make_cfg(
        [f"ckpt_path={metrics['ckpt_path']}", "dataset.split.unseen_class_names=[red dots]"], config_name="eval", subdir="eval"
    )
    with pytest.raises(CheckpointMismatchError, match=r"split.unseen_class_names differs.*checkpoint has"):
        evaluate(other)
    missing = make_cfg(["ckpt_path=/nonexistent/best.ckpt"], config_name="eval", subdir="eval2")
    with pytest.raises(FileNotFoundError, match="/nonexistent/best.ckpt"):
        evaluate(missing)


def test_exactly_the_student_parameters_receive_gradients(make_cfg) -> None:
    objects = build_run(make_cfg())
    model, datamodule = objects["model"], objects["datamodule"]
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model.train()
    losses = model.training_losses(batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            assert parameter.grad is None and not parameter.requires_grad, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            # timm zero-initialises the last BN of each residual branch, so some backbone grads
            # are exactly zero at step 0; every head parameter must move
            if name.startswith("head."):
                assert parameter.grad.abs().sum() > 0, name
    optimised = {id(p) for group in model.parameter_groups() for p in group["params"]}
    expected = {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert optimised == expected
    # inference: logits over all classes at the input size
    model.eval()
    with torch.no_grad():
        logits = model(batch["image"])
    assert logits.shape == (8, 16, 32, 32) and torch.isfinite(logits).all()


def test_lr_multipliers_and_weight_decay_groups(make_cfg) -> None:
    cfg = make_cfg(["+method.lr_multipliers.head=10.0"])
    model = build_run(cfg)["model"]
    groups = model.parameter_groups()
    lr = cfg.method.optimizer.lr
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if name.startswith("teacher."):
            continue
        group = by_id[id(parameter)]
        assert group["lr"] == pytest.approx(lr * (10.0 if name.startswith("head.") else 1.0)), name
        assert group["weight_decay"] == (0.0 if parameter.ndim <= 1 else cfg.method.optimizer.weight_decay), name
    bad = make_cfg(["+method.lr_multipliers.neck=2.0"])
    with pytest.raises(ValueError, match=r"lr_multipliers names \['neck'\]"):
        build_run(bad)["model"].parameter_groups()


def test_bf16_mixed_precision_trains_and_evaluates_on_cpu(make_cfg) -> None:
    cfg = make_cfg(["trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.val_check_interval=2"])
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert all(math.isfinite(metrics[k]) for k in ("sIoU", "mIoU", "pAcc"))
    assert math.isfinite(metrics["train/loss"])


def _step_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_final_test_uses_the_last_checkpoint_when_test_images_are_validation_images(make_cfg) -> None:
    # validations at steps 2 and 4, training ends at 5: the best checkpoint can only be step 2 or 4
    steps = ["trainer.max_steps=5", "trainer.val_check_interval=2"]
    # the real benchmarks' protocol: no separate test split, the test runs on the validation images
    shared_cfg = make_cfg([*steps, "dataset.test_dataset=null"], subdir="shared")
    metrics, objects = train(shared_cfg)
    written = read_metrics(Path(shared_cfg.paths.output_dir))
    assert written["tested_checkpoint"] == metrics["tested_checkpoint"] == "last"
    assert "the test split is the validation split" in written["tested_checkpoint_reason"]
    assert Path(written["ckpt_path"]).name == "last.ckpt" and _step_of(written["ckpt_path"]) == 5
    best = objects["trainer"].checkpoint_callback.best_model_path
    assert _step_of(best) in (2, 4)

    # the toy world's disjoint splits: best by validation, as before
    disjoint_cfg = make_cfg(steps, subdir="disjoint")
    metrics = train(disjoint_cfg)[0]
    written = read_metrics(Path(disjoint_cfg.paths.output_dir))
    assert written["tested_checkpoint"] == "best" and "disjoint" in written["tested_checkpoint_reason"]
    assert Path(written["ckpt_path"]).name.startswith("best_step") and _step_of(written["ckpt_path"]) in (2, 4)


def test_test_checkpoint_can_be_overridden_and_a_bad_value_stops_before_training(make_cfg) -> None:
    cfg = make_cfg(["test_checkpoint=last"], subdir="last")
    metrics = train(cfg)[0]
    assert (
        metrics["tested_checkpoint"] == "last" and "test_checkpoint=last set in the config" in metrics["tested_checkpoint_reason"]
    )
    assert _step_of(metrics["ckpt_path"]) == 4
    bad = make_cfg(["test_checkpoint=newest"], subdir="bad")
    with pytest.raises(ValueError, match=r"test_checkpoint='newest': expected one of auto, best, last"):
        train(bad)
    assert not (Path(bad.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize("trainer_clip", [None, 0.5])
def test_the_methods_own_gradient_clip_applies_unless_the_trainer_sets_one(make_cfg, monkeypatch, trainer_clip) -> None:
    """``method.gradient_clip_norm`` (Mask2Former's full-model clip) bounds the gradient norm the
    optimizer steps with; ``trainer.gradient_clip_val`` wins when given."""
    from zeroseg.train import train

    norms: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, closure):
        loss = closure()  # Lightning's closure: forward, backward, then the gradient clipping
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, closure=lambda: loss)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    overrides = ["+method.gradient_clip_norm=0.001", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    if trainer_clip is not None:
        overrides.append(f"trainer.gradient_clip_val={trainer_clip}")
    train(make_cfg(overrides))
    limit = 0.001 if trainer_clip is None else trainer_clip
    assert len(norms) == 3 and all(n <= limit * (1 + 1e-4) for n in norms), norms
    assert max(norms) > 0.0009  # clipped to the limit, not vanished (unclipped norms are far larger)
