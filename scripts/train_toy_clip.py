"""Pretrain the toy CLIP on ZSS-Synth concepts and write its weights (fp16 safetensors).

    python scripts/train_toy_clip.py                          # the shipped model: all 16 classes, 400 steps
    python scripts/train_toy_clip.py --pretrain-classes seen  # control: never sees the unseen concepts
    python scripts/train_toy_clip.py --steps 5 --bank-size 256 --out /tmp/toy.safetensors  # smoke test

The class list and unseen split are read from the packaged ``conf/dataset/synthetic.yaml``.
Prints the zero-shot crop accuracy as it trains and a final evaluation on fresh data, and writes
``<out>.json`` with the report. Deterministic on CPU for a given --seed and --threads. Run time
of the shipped model (400 steps, batch 128, 2 threads, this 2-core machine): see README.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import OmegaConf

from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.toy.clip import ToyPretrainingConfig, evaluate_toy_clip, save_toy_clip, toy_model_cfg, train_toy_clip

DEFAULT_OUT = Path(str(files("zeroseg") / "assets" / "toy_clip.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ToyPretrainingConfig()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pretrain-classes", choices=["all", "seen"], default="all")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--bank-size", type=int, default=defaults.bank_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--pool", choices=["tok", "avg"], default=toy_model_cfg()["vision_cfg"]["pool_type"])
    parser.add_argument("--dense-loss-weight", type=float, default=defaults.dense_loss_weight)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    dataset_cfg = OmegaConf.load(str(files("zeroseg") / "conf" / "dataset" / "synthetic.yaml"))
    class_names = list(dataset_cfg.split.class_names)
    unseen = list(dataset_cfg.split.unseen_class_names)
    pretrain_names = class_names if args.pretrain_classes == "all" else [c for c in class_names if c not in unseen]
    model_cfg = toy_model_cfg()
    model_cfg["vision_cfg"]["pool_type"] = args.pool
    config = ToyPretrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        bank_size=args.bank_size,
        lr=args.lr,
        seed=args.seed,
        dense_loss_weight=args.dense_loss_weight,
    )
    model, report = train_toy_clip(class_names, pretrain_names, config, model_cfg)
    path = save_toy_clip(model, args.out)
    teacher = CLIPTeacher(arch="toy", pretrained=str(path), model_cfg=model_cfg)
    report["evaluation"] = evaluate_toy_clip(teacher, class_names, unseen)
    report["model_cfg"] = model_cfg
    report["file_megabytes"] = path.stat().st_size / 1e6
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("bank_seconds", "train_seconds", "file_megabytes", "evaluation")}, indent=2))


if __name__ == "__main__":
    main()
