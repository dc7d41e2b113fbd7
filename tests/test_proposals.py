"""The frozen proposal model of two-stage methods (models/proposals.py): rebuilt from a query run's
checkpoint alone, it predicts what the trained method itself predicts; other checkpoints fail with
errors that name what wrote them and what produces the right one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_OVERRIDES
from zeroseg.build import build_run
from zeroseg.models.proposals import load_proposal_model

QUERY_TINY = [o for o in TINY_OVERRIDES if not o.startswith("method")] + [
    "method=query_baseline",
    "method.segmenter.dim=32",
    "method.segmenter.conv_dim=24",
    "method.segmenter.mask_dim=16",
    "method.segmenter.ffn_dim=64",
    "method.segmenter.encoder_ffn_dim=64",
    "method.segmenter.num_queries=5",
    "method.matcher.num_points=64",
    "method.criterion.num_points=64",
    "method.input_scale=1.5",
    "test=false",
]


@pytest.fixture(scope="module")
def query_run(tmp_path_factory) -> Path:
    from conftest import compose_test_config
    from zeroseg.train import train

    tmp_path = tmp_path_factory.mktemp("query_run")
    cfg = compose_test_config(tmp_path, QUERY_TINY, tiny=False)
    train(cfg)
    return Path(cfg.paths.output_dir)


def _trained_method(run_dir: Path, tmp_path: Path):
    """The trained QueryBaseline, built from the run's own config and loaded as Lightning loads it."""
    from conftest import compose_test_config

    cfg = compose_test_config(tmp_path, QUERY_TINY, tiny=False)
    model = build_run(cfg, with_callbacks=False)["model"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def test_the_proposal_model_predicts_what_the_trained_method_predicts(query_run: Path, tmp_path: Path) -> None:
    proposals = load_proposal_model(str(query_run / "checkpoints" / "last.ckpt"))
    method = _trained_method(query_run, tmp_path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.predictions(images, method.class_text_embeddings)[-1]
    got = proposals(images, method.class_text_embeddings)[-1]
    assert proposals.num_queries == 5 and proposals.class_head == "text"
    assert got.mask_logits.shape == (2, 5, 12, 12)  # 1/4 of the x1.5 images: the run's input_scale applies
    torch.testing.assert_close(got.mask_logits, expected.mask_logits)
    torch.testing.assert_close(got.class_logits, expected.class_logits)
    # without class embeddings a text head gives the same masks (only the no-object column)
    alone = proposals(images)[-1]
    torch.testing.assert_close(alone.mask_logits, expected.mask_logits)
    assert alone.class_logits.shape == (2, 5, 1)


def test_the_proposal_model_stays_frozen_in_eval_mode(query_run: Path) -> None:
    proposals = load_proposal_model(str(query_run / "checkpoints" / "last.ckpt"))
    parent = torch.nn.ModuleDict({"proposals": proposals})
    parent.train()
    assert not proposals.training and not any(m.training for m in proposals.modules())
    assert not any(p.requires_grad for p in proposals.parameters())


def test_an_older_checkpoint_is_rebuilt_from_its_run_config(query_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(query_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["zeroseg"]["model_config"]
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, old_run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="config.yaml"):
        load_proposal_model(str(old_run / "checkpoints" / "last.ckpt"))
    run_config = yaml.safe_load((query_run / "config.yaml").read_text()) if (query_run / "config.yaml").is_file() else None
    assert run_config is not None, "a training run writes its config.yaml"
    (old_run / "config.yaml").write_text(yaml.safe_dump(run_config))
    reference = load_proposal_model(str(query_run / "checkpoints" / "last.ckpt"))
    rebuilt = load_proposal_model(str(old_run / "checkpoints" / "last.ckpt"))
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images)[-1].mask_logits, reference(images)[-1].mask_logits)


def test_a_per_pixel_checkpoint_names_its_method_and_the_producing_command(make_cfg) -> None:
    from zeroseg.train import train

    cfg = make_cfg(["test=false", "trainer.max_steps=1"])
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"method\.proposals\.ckpt_path=.*written by method Baseline.*experiment=x_stage1"):
        load_proposal_model(str(path), produced_by="python -m zeroseg.train experiment=x_stage1")


def test_a_missing_or_unset_checkpoint_names_the_key_and_the_producing_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"proposals\.ckpt_path='.*nope.ckpt'.*stage1"):
        load_proposal_model(str(tmp_path / "nope.ckpt"), key="proposals.ckpt_path", produced_by="stage1")
    with pytest.raises(ValueError, match=r"method\.proposals\.ckpt_path is not set.*stage1"):
        load_proposal_model(None, produced_by="stage1")
