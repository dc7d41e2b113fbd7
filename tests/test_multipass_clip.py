"""The multi-pass frozen-CLIP baseline (method=multipass_clip): the batched crops equal a plain per-proposal loop,
MAFT Eq. 9 by hand, training through the CLI with its own proposal network and training-free evaluation with
frozen proposals from a query_baseline run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from conftest import PROPOSALS_TINY, TINY_OVERRIDES
from zeroseg.build import build_run
from zeroseg.methods.multipass_clip import ensemble_class_probabilities

TINY = [o for o in TINY_OVERRIDES if not o.startswith("method")] + [
    "method=multipass_clip",
    "clip=toy",
    *PROPOSALS_TINY,
    "method.max_regions_per_forward=4",
    "dataset.train_dataset.scene.image_size=64",
]


def test_batched_crops_equal_a_plain_per_proposal_loop(make_cfg) -> None:
    model = build_run(make_cfg(TINY, tiny=False), with_callbacks=False)["model"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 48, 40, generator=generator)
    masks = torch.zeros(2, 3, 48, 40, dtype=torch.bool)
    masks[0, 0, 5:20, 3:30] = True
    masks[0, 1] = torch.rand(48, 40, generator=generator) > 0.7
    masks[1, 0, 30:47, 10:12] = True
    masks[1, 2, 0:48, 0:40] = True
    valid = masks.flatten(2).any(-1)  # (0, 2) and (1, 1) are empty
    texts = F.normalize(torch.randn(5, model.teacher.embed_dim, generator=generator), dim=-1)
    probabilities = model.clip_class_probabilities(images, masks, valid, texts)
    mean = model.teacher.pixel_mean.view(3, 1, 1)
    for b in range(2):
        for n in range(3):
            if not bool(valid[b, n]):
                assert bool((probabilities[b, n] == 0).all())
                continue
            # one proposal at a time: fill outside with CLIP's mean colour, crop its box, resize, one teacher pass
            ys, xs = torch.nonzero(masks[b, n], as_tuple=True)
            box = torch.tensor([[0, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]], dtype=torch.float32)
            filled = torch.where(masks[b, n], images[b], mean)[None]
            crop = roi_align(filled, box, output_size=(model.crop_size, model.crop_size), spatial_scale=1.0, sampling_ratio=2, aligned=False)
            token = model.teacher.encode_image(crop)[0][0]
            expected = (F.normalize(token, dim=-1) @ texts.t() / model.temperature).softmax(-1)
            assert torch.allclose(probabilities[b, n], expected, atol=1e-5), (b, n)


def test_maft_eq_9_by_hand() -> None:
    clip = torch.tensor([[0.5, 0.3, 0.2]])
    proposal = torch.tensor([[0.2, 0.6, 0.1]])
    unseen = torch.tensor([False, False, True])
    result = ensemble_class_probabilities(clip, proposal, unseen, 0.7)
    expected = [0.2**0.7 * 0.5**0.3, 0.6**0.7 * 0.3**0.3, 0.2**0.7]
    assert torch.allclose(result[0], torch.tensor(expected), atol=1e-6)


def test_multipass_clip_trains_its_proposals_and_is_training_free_with_frozen_ones(make_cfg) -> None:
    from zeroseg.eval import evaluate
    from zeroseg.train import train

    cfg = make_cfg([*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"], tiny=False, subdir="joint")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and math.isfinite(metrics["train/loss"]) and 0 <= metrics["hIoU"] <= 100
    assert objects["model"].trainable
    # frozen proposals from a query_baseline run: nothing to train, evaluated without a checkpoint
    query = [o for o in TINY if not o.startswith("method")] + [
        "method=query_baseline", *[o.replace("method.proposals.", "method.") for o in PROPOSALS_TINY], "trainer.max_steps=2", "test=false"
    ]
    query_cfg = make_cfg(query, tiny=False, subdir="query")
    train(query_cfg)
    ckpt = Path(query_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_overrides = [o for o in TINY if not o.startswith(("callbacks", "trainer.max_steps", "trainer.val_check"))]
    eval_cfg = make_cfg([*eval_overrides, f"method.proposals.ckpt_path={ckpt}"], config_name="eval", tiny=False, subdir="eval")
    metrics, objects = evaluate(eval_cfg)
    assert not objects["model"].trainable and metrics["tested_checkpoint"] == "none" and 0 <= metrics["hIoU"] <= 100
    with pytest.raises(RuntimeError, match="nothing to train"):
        objects["model"].training_losses({"image": torch.rand(1, 3, 64, 64), "label": torch.zeros(1, 64, 64, dtype=torch.long)})
