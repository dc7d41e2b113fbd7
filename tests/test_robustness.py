"""Runs that never lose work or report a wrong result: preemption, non-finite losses, resume, atomic
writes, unique run directories, data verified up front, errors that name their culprit."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from dataset_trees import write_voc
from zeroseg.build import CheckpointFileError, build_run, check_checkpoint_fits
from zeroseg.callbacks import AtomicCheckpointIO, NonFiniteLossError
from zeroseg.data.verify import DatasetVerificationError
from zeroseg.data.verify import main as verify_main
from zeroseg.methods import CheckpointMismatchError
from zeroseg.metrics import SUMMARY_KEYS
from zeroseg.train import resume_checkpoint, train
from zeroseg.utils.atomic import AtomicWriteError
from zeroseg.utils.instantiate import instantiate_loggers
from zeroseg.utils.run_dirs import _RESOLVED, RUN_MARKER, RunInUseError, config_key, find_resumable_run, new_run_dir, run_lock

from conftest import REAL_TINY_OVERRIDES, TINY_OVERRIDES, subprocess_env

# 48 images / batch 8 = 6 steps per epoch; the tiny runs score hIoU 0 at every validation (no unseen
# pixel is found that early), so the best checkpoint is the first validation's: an "early best"
SIGTERM_RUN = ["trainer.max_steps=24", "trainer.val_check_interval=6", "callbacks.last_every_n_steps=1000", "logger=csv"]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_metrics(a: dict, b: dict) -> None:
    for key in SUMMARY_KEYS:
        assert (a[key] is None and b[key] is None) or math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-9), key
    assert a["per_class_iou"] == b["per_class_iou"]


# -- 1 + 3: preemption, then resume=auto in the same directory ------------------------------------------------
def test_sigterm_saves_the_current_step_exits_nonzero_and_resuming_in_place_equals_the_uninterrupted_run(
    make_cfg, tmp_path: Path
) -> None:
    env = subprocess_env()
    env.update({"ZEROSEG_ROOT": str(tmp_path), "ZEROSEG_CACHE_DIR": str(tmp_path / "cache")})
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "trainer.enable_progress_bar"))]
    command = [
        sys.executable, "-m", "zeroseg.train", *tiny, *SIGTERM_RUN, "trainer.enable_progress_bar=true",
        "+callbacks.progress_bar._target_=zeroseg.callbacks.StepProgressBar", "+callbacks.progress_bar.log_every_n_steps=1",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "step 8/24" in line:  # progress lines (not a terminal) show step / max_steps
            process.send_signal(signal.SIGTERM)
    output = "".join(lines)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, output[-3000:]
    assert "validation at step 6: hIoU" in output  # validation metrics reach the console and the log
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert "SIGTERM received: stopped at step " in output, output[-3000:]
    stopped = int(output.split("SIGTERM received: stopped at step ")[1].split("/")[0])
    assert 8 <= stopped < 24
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == stopped
    assert not (run_dir / "metrics.json").exists()
    run_log = (run_dir / "train.log").read_text()
    assert "SIGTERM received" in run_log and "validation at step 6: hIoU" in run_log and "step 8/24" in run_log
    assert "💡 Tip" not in output and "LeafSpec" not in output and "in eval mode" not in output  # known noise silenced

    # `<same command> resume=auto` (the resolver that picks run_dir is tested below): continue in run_dir
    resumed_cfg = make_cfg([*SIGTERM_RUN, "resume=auto"], subdir="resumed")
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(run_dir)
    train(resumed_cfg)

    full_cfg = make_cfg(SIGTERM_RUN, subdir="full")
    train(full_cfg)
    full_dir = Path(full_cfg.paths.output_dir)
    assert_same_metrics(read_metrics(run_dir), read_metrics(full_dir))
    assert Path(read_metrics(run_dir)["ckpt_path"]).name == Path(read_metrics(full_dir)["ckpt_path"]).name
    # the CSV log continues without overlap: row for row the uninterrupted run's
    assert (run_dir / "csv" / "metrics.csv").read_text() == (full_dir / "csv" / "metrics.csv").read_text()


# -- 2: non-finite loss ---------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_before_the_update_naming_the_step(make_cfg) -> None:
    # lr 1e30: the first update multiplies the weights by ~1e30, so the loss of step 2 is the first NaN
    overrides = ["method.optimizer.lr=1e30", "trainer.max_steps=6", "trainer.val_check_interval=1"]
    cfg = make_cfg(overrides)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 2/6: train/loss=nan.*last\.ckpt \(step 1\)"):
        train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "metrics.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())

    # skipping: steps 2 and 3 are skipped (no update, so the weights stay as they are), step 4 stops the run
    skipping = make_cfg([*overrides, "callbacks.nonfinite_loss.max_skipped_steps=2"], subdir="skip")
    with pytest.raises(NonFiniteLossError, match=r"at step 4/6"):
        train(skipping)


# -- 3: resume into a new directory keeps the best -----------------------------------------------------------
def test_resume_into_a_new_directory_tests_the_same_best_checkpoint_as_the_uninterrupted_run(make_cfg) -> None:
    # validation hIoU at steps 2..12 of this run: 0, 0, 0.58, 1.67, 1.04, 1.03 — the best (step 8) comes
    # before the "interrupt" at step 9, and the first validation after it (step 10) is worse
    overrides = ["trainer.max_steps=12", "trainer.val_check_interval=2"]
    full_cfg = make_cfg(overrides, subdir="full")
    with open_dict(full_cfg):  # a checkpoint at step 9, between validations: the "interrupt"
        full_cfg.callbacks.step_checkpoint = {
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "dirpath": f"{full_cfg.paths.output_dir}/steps",
            "filename": "step{step}", "every_n_train_steps": 9, "save_top_k": -1, "monitor": None,
            "auto_insert_metric_name": False,
        }  # fmt: skip
    full_metrics, _ = train(full_cfg)
    best_step = torch.load(full_metrics["ckpt_path"], map_location="cpu", weights_only=False)["global_step"]
    assert best_step < 9  # the best validation came before the interrupt

    resumed_cfg = make_cfg([*overrides, f"ckpt_path={full_cfg.paths.output_dir}/steps/step9.ckpt"], subdir="resumed")
    resumed_metrics, _ = train(resumed_cfg)
    assert resumed_metrics["ckpt_path"] == full_metrics["ckpt_path"]
    assert_same_metrics(read_metrics(Path(resumed_cfg.paths.output_dir)), read_metrics(Path(full_cfg.paths.output_dir)))
    assert Path(full_metrics["ckpt_path"]).is_file()  # never deleted by the run that continued it


# -- 4: atomic writes ------------------------------------------------------------------------------------------
def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_one_loadable(make_cfg, tmp_path, monkeypatch) -> None:
    trainer = build_run(make_cfg())["trainer"]
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    io, path = trainer.strategy.checkpoint_io, tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.arange(4.0)}, path)

    def full_disk(obj, handle, *args, **kwargs) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(AtomicWriteError, match=r"checkpoint .*last\.ckpt: the disk is full.*previous last\.ckpt is left intact"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# -- 5: unique run directories ---------------------------------------------------------------------------------
def test_simultaneous_launches_get_their_own_directories_and_resume_finds_its_own_run(make_cfg, tmp_path: Path) -> None:
    now = datetime(2030, 1, 2, 3, 4, 5)
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(new_run_dir(tmp_path / "runs", "k", now=now))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 6 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made)[0] == "2030-01-02_03-04-05"

    # through Hydra's own run-dir interpolation, as two launches of the CLI compose it
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def launch(*overrides: str) -> Path:
        _RESOLVED.clear()  # a new process
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
            cfg = compose("train", [f"paths.log_dir={tmp_path / 'logs'}", *overrides], return_hydra_config=True)
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))

    first, second = launch(), launch()
    assert first != second and first.parent == second.parent
    keys = [json.loads((run / RUN_MARKER).read_text())["config_key"] for run in (first, second)]
    assert keys[0] == keys[1]
    (first / "checkpoints").mkdir()
    (first / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert launch("resume=auto") == first  # the newest run of this config that has a checkpoint
    assert launch("resume=auto", "seed=7") not in (first, second)  # another config: a new run
    assert find_resumable_run(first.parent, "no such key") is None
    assert config_key(make_cfg()) == config_key(make_cfg(["resume=auto"]))
    with run_lock(first):  # a live run: a second process continuing it is refused
        with pytest.raises(RunInUseError, match=f"run directory {first} is in use by another process \\(pid {os.getpid()}"):
            with run_lock(first):
                pass
    # one W&B run per run directory: a resumed run logs into the same W&B run
    wandb_cfg = make_cfg(["logger=wandb"], subdir="wandb")
    ids = [instantiate_loggers(wandb_cfg.logger, run_dir=str(first))[0]._wandb_init for _ in range(2)]
    assert ids[0]["id"] == ids[1]["id"] == (first / ".wandb_run_id").read_text().strip() and ids[0]["resume"] == "allow"


# -- 6: data verified up front ---------------------------------------------------------------------------------
def test_verify_lists_every_bad_file_of_a_tree_with_several_faults(make_cfg, tmp_path: Path, capsys, monkeypatch) -> None:
    data = tmp_path / "data"
    tree = write_voc(data, n_train=4, n_aug=3, n_val=3)
    root = data / "VOCdevkit/VOC2012"
    train_ids, val_ids = tree["train"], tree["val"]
    missing = root / "JPEGImages" / f"{train_ids[1]}.jpg"
    missing.unlink()
    truncated = root / "JPEGImages" / f"{train_ids[2]}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    out_of_range = root / "SegmentationClassAug" / f"{train_ids[4]}.png"  # an aug-only id
    Image.fromarray(np.full((60, 80), 57, np.uint8)).save(out_of_range)
    wrong_size = root / "SegmentationClass" / f"{val_ids[0]}.png"
    Image.fromarray(np.zeros((30, 80), np.uint8)).save(wrong_size)
    rgb_label = root / "SegmentationClass" / f"{val_ids[2]}.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(rgb_label)
    bad_files = [missing, truncated, out_of_range, wrong_size, rgb_label]

    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    overrides = ["dataset=voc", f"paths.data_dir={data}", cache, "dataset.num_workers=0"]
    assert verify_main(overrides) == 1
    printed = capsys.readouterr().out
    problem_lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(problem_lines) == len(bad_files), printed
    for bad in bad_files:
        assert sum(str(bad) in line for line in problem_lines) == 1, (bad, printed)
    assert "holds values [57]" in printed and "is 80x30 but its image" in printed and "image mode RGB" in printed
    assert "problem(s)" in printed.splitlines()[-1] and " 5 problem" in printed.splitlines()[-1]

    # at setup, before any batch: the run stops with the list
    cfg = make_cfg(["dataset=voc", *REAL_TINY_OVERRIDES], subdir="run")
    with open_dict(cfg):
        cfg.paths.data_dir = str(data)
    import hydra

    datamodule = hydra.utils.instantiate(cfg.dataset)
    with pytest.raises(DatasetVerificationError, match=r"(?s)5 problem\(s\).*does not exist.*zeroseg.data.verify dataset=voc"):
        datamodule.prepare_data()

    # a sound tree passes once, then is skipped until a file changes; dataset.verify=false skips the check
    sound = tmp_path / "sound"
    write_voc(sound)
    sound_overrides = ["dataset=voc", f"paths.data_dir={sound}", cache, "dataset.num_workers=0"]
    assert verify_main(sound_overrides) == 0
    from zeroseg.data.folders import SegmentationFolder

    def must_not_run(self, index):
        raise AssertionError("verified again although nothing changed")

    monkeypatch.setattr(SegmentationFolder, "check_item", must_not_run)
    assert verify_main(sound_overrides) == 0
    label = next((sound / "VOCdevkit/VOC2012/SegmentationClass").iterdir())
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="verified again"):
        verify_main(sound_overrides)
    cfg_off = make_cfg(["dataset=voc", "dataset.verify=false", *REAL_TINY_OVERRIDES], subdir="off")
    hydra.utils.instantiate(cfg_off.dataset).prepare_data()  # no check: the data dir does not even exist


# -- 7: errors that name their culprit ------------------------------------------------------------------------
def test_errors_name_the_file_the_key_and_the_option_to_use(make_cfg, tmp_path: Path, caplog) -> None:
    metrics, objects = train(make_cfg(subdir="train"))
    good = Path(metrics["ckpt_path"])
    model = objects["model"]

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(CheckpointFileError, match=r"truncated\.ckpt' \(20,000 bytes\) is truncated or not a checkpoint"):
        check_checkpoint_fits(truncated, model)
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3: looks good\n")
    with pytest.raises(CheckpointFileError, match=r"notes\.ckpt' .* is a text file"):
        check_checkpoint_fits(text, model)

    other_backbone = build_run(make_cfg(["backbone=resnet18"], subdir="r18"))["model"]
    with pytest.raises(CheckpointMismatchError, match=r"(?s)differ in shape.*its run used method=baseline backbone=resnet10t"):
        check_checkpoint_fits(good, other_backbone)
    other_method = build_run(make_cfg(["method=clip_zero_shot"], tiny=False, subdir="zs"))["model"]
    with pytest.raises(CheckpointMismatchError, match=r"written by method Baseline; .* add method=baseline"):
        check_checkpoint_fits(good, other_method)

    with pytest.raises(ValueError, match=r"resume='yes': expected resume=auto"):
        resume_checkpoint(make_cfg(["resume=yes"], subdir="yes"))
    with pytest.raises(ValueError, match=r"trainer\.max_steps='abc': expected a whole number"):
        build_run(make_cfg(["trainer.max_steps=abc"], subdir="abc"))
    # logger=none with the default callbacks: the LR monitor is dropped instead of stopping the run
    assert build_run(make_cfg(["logger=none", "callbacks=default"], subdir="none"))["trainer"] is not None

    from zeroseg.utils import warn_unknown_keys

    with caplog.at_level(logging.WARNING):
        assert warn_unknown_keys(make_cfg(["+seeed=1"], subdir="typo"), "train") == ["seeed"]
    assert "config key 'seeed' is not a zeroseg setting" in caplog.text and "did you mean seed?" in caplog.text


def test_class_names_the_tokenizer_truncates_to_the_same_text_are_reported(tiny_teacher, caplog) -> None:
    from zeroseg.methods.base import warn_identical_embeddings

    # context length 16: "a photo of a" + 12 words of a shared prefix cut both names to the same tokens
    prefix = " ".join(["very"] * 14)
    names = ("cat", f"{prefix} small dog", f"{prefix} large dog")
    with caplog.at_level(logging.WARNING):
        pairs = warn_identical_embeddings(names, tiny_teacher.encode_text(names))
    assert pairs == [(names[1], names[2])]
    assert "identical text embeddings" in caplog.text and "dataset.split.rename" in caplog.text


# -- 8: a console a person can follow ----------------------------------------------------------------------
def test_progress_bar_counts_optimizer_steps_of_the_whole_run_across_epochs_and_resume(make_cfg, monkeypatch) -> None:
    import zeroseg.callbacks as callbacks

    monkeypatch.setattr(callbacks, "_stdout_is_terminal", lambda: True)  # the rich bar, as on a terminal
    shown: list[tuple[str, int, int]] = []
    original_update = callbacks.StepProgressBar._update

    def record(self, bar_id, current, *args, **kwargs):
        if bar_id is not None and bar_id == self.train_progress_bar_id:
            task = self.progress.tasks[bar_id]
            shown.append((str(task.description), int(current), int(task.total)))
        return original_update(self, bar_id, current, *args, **kwargs)

    monkeypatch.setattr(callbacks.StepProgressBar, "_update", record)
    bar = ["trainer.enable_progress_bar=true", "+callbacks.progress_bar._target_=zeroseg.callbacks.StepProgressBar", "test=false"]
    first = make_cfg([*bar, "trainer.max_steps=3", "trainer.val_check_interval=3"], subdir="first")
    train(first)
    shown.clear()
    # 48 images / batch 8: steps 4..9 cross an epoch boundary at step 6
    train(make_cfg([*bar, "trainer.max_steps=9", f"ckpt_path={first.paths.output_dir}/checkpoints/last.ckpt"], subdir="resumed"))
    assert {total for _, _, total in shown} == {9}
    steps = [current for _, current, _ in shown if current]
    assert steps[0] in (3, 4) and steps[-1] == 9 and steps == sorted(steps)  # from the resumed step on, never reset
    assert all(description.strip() == "train step" for description, _, _ in shown)


def test_prepare_help_answers_without_importing_lightning() -> None:
    probe = "import sys, zeroseg.data.prepare, zeroseg.data.verify; print(sorted(m for m in sys.modules if 'lightning' in m))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_a_non_finite_validation_score_never_becomes_the_best_checkpoint(tmp_path: Path, monkeypatch, caplog) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from zeroseg.callbacks import RunCheckpoint

    offered = []
    monkeypatch.setattr(ModelCheckpoint, "_save_topk_checkpoint", lambda self, trainer, candidates: offered.append(candidates))
    callback = RunCheckpoint(dirpath=str(tmp_path), monitor="val/hIoU", mode="max")
    trainer = SimpleNamespace(global_step=6, max_steps=10)
    with caplog.at_level(logging.WARNING):
        for value in (float("nan"), float("inf"), 0.5):
            callback._save_topk_checkpoint(trainer, {"val/hIoU": torch.tensor(value)})
    assert [float(c["val/hIoU"]) for c in offered] == [0.5]  # only the finite score reaches the top-k logic
    assert "val/hIoU is nan" in caplog.text and "not a candidate for the best checkpoint" in caplog.text
