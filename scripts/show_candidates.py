"""Draw what Split Matching's candidate queries segment (split_matching.txt Fig. 5): one row per test image
with the image, its ground truth, the overall prediction and the candidate queries' prediction.

    python scripts/show_candidates.py <run dir> [--checkpoint last|best|<file>] [--out <png>] [--images 6]

The run directory is one written by ``python -m zeroseg.train method=split_matching ...`` (its
``config.yaml`` and ``checkpoints/``); the images are the first ones of its dataset's test split (the toy
world's scenes or a real benchmark's images). The overall prediction is the model's inference (seen,
candidate and random queries over all classes); the candidate panel is ``Σ_q S_q · sigmoid(M_q)`` over the
candidate queries alone, black where their best score stays under ``--threshold`` (nothing claimed).
Colours are per class (the same in every panel; ignore pixels black); unseen classes are listed under the
figure. Writes ``<run dir>/candidates.png`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from PIL import Image, ImageDraw
from torch import Tensor

from zeroseg.build import build_run, read_checkpoint
from zeroseg.methods.split_matching import CANDIDATE, SplitMatching, sigmoid_semantic_inference

PALETTE = (np.random.default_rng(7).random((256, 3)) * 200 + 40).astype(np.uint8)
PALETTE[255] = 0  # ignore / nothing claimed
TITLES = ("image", "ground truth", "prediction", "candidate queries")


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if which not in ("last", "best"):
        return Path(which)
    folder = run_dir / "checkpoints"
    if which == "last" and (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    best = sorted(folder.glob("best*.ckpt"))
    if best:
        return best[-1]
    raise FileNotFoundError(f"no {which} checkpoint in {folder}")


def load_model(run_dir: Path, checkpoint: str) -> tuple[SplitMatching, object]:
    """The run's model (weights from its checkpoint, teacher from its config) and datamodule."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(cfg):
        cfg.logger = None  # drawing writes no logs
    objects = build_run(cfg, with_callbacks=False)
    model = objects["model"]
    if not isinstance(model, SplitMatching):
        raise ValueError(f"{run_dir} was trained with {type(model).__name__}; this figure needs method=split_matching")
    state = read_checkpoint(find_checkpoint(run_dir, checkpoint))
    model.on_load_checkpoint(state)
    model.load_state_dict(state["state_dict"])
    return model.eval(), objects["datamodule"]


@torch.no_grad()
def candidate_prediction(model: SplitMatching, image: Tensor, threshold: float) -> np.ndarray:
    """Argmax over all classes of the candidate queries' scores; 255 where none reaches ``threshold``."""
    predictions, groups = model.query_predictions(image, random_queries=False)
    final, keep = predictions[-1], groups == CANDIDATE
    probs = model.class_logits(final.embeddings[:, keep], model.class_text_embeddings).sigmoid()
    scores = sigmoid_semantic_inference(probs, final.mask_logits[:, keep], image.shape[-2:], model.inference_order)
    best, label = scores.max(dim=1)
    return torch.where(best >= threshold, label, torch.full_like(label, 255))[0].cpu().numpy().astype(np.uint8)


def _panel(array: np.ndarray, size: tuple[int, int], nearest: bool) -> Image.Image:
    image = Image.fromarray(array)
    return image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="last", help="last | best | a checkpoint file")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--scale", type=int, default=2, help="panels are enlarged by this factor (nearest)")
    args = parser.parse_args(argv)
    model, datamodule = load_model(args.run_dir, args.checkpoint)
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    rows, size = [], None
    for index in range(min(args.images, len(dataset))):
        sample = dataset[index]
        image, label = sample["image"].unsqueeze(0).float(), sample["label"]
        with torch.no_grad():
            overall = model.segment(image, label.shape[-2:]).argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        candidates = candidate_prediction(model, image, args.threshold)
        candidates = F.interpolate(torch.from_numpy(candidates)[None, None].float(), size=label.shape[-2:], mode="nearest")
        size = size or tuple(int(s) * args.scale for s in label.shape[-2:])
        picture = (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        rows.append(
            [
                _panel(picture, size, nearest=False),
                _panel(PALETTE[label.numpy().astype(np.uint8)], size, nearest=True),
                _panel(PALETTE[overall], size, nearest=True),
                _panel(PALETTE[candidates[0, 0].numpy().astype(np.uint8)], size, nearest=True),
            ]
        )
    if not rows:
        print(f"error: the test split of {args.run_dir} has no images", file=sys.stderr)
        return 1
    header, footer = 14, 14
    sheet = Image.new("RGB", (len(TITLES) * size[1], header + len(rows) * size[0] + footer), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(TITLES):
        draw.text((column * size[1] + 2, 1), title, fill=(0, 0, 0))
    for r, panels in enumerate(rows):
        for column, panel in enumerate(panels):
            sheet.paste(panel, (column * size[1], header + r * size[0]))
    unseen = ", ".join(model.split.unseen_class_names)
    draw.text((2, header + len(rows) * size[0] + 1), f"unseen: {unseen}", fill=(0, 0, 0))
    out = args.out or args.run_dir / "candidates.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({len(rows)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
