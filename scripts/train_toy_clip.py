"""Pretrain a toy CLIP on ZSS-Synth concepts and write its weights (fp16 safetensors).

    python scripts/train_toy_clip.py                          # the shipped clip=toy: CLS pooling, 600 steps
    python scripts/train_toy_clip.py --pool avg --steps 400 --dense-loss-weight 0 --token-loss-weight 0 \
        --out /tmp/toy_mean.safetensors                       # session 1's mean-token-pooled model
    python scripts/train_toy_clip.py --pretrain-classes seen  # control: never sees the unseen concepts
    python scripts/train_toy_clip.py --steps 5 --bank-size 256 --out /tmp/toy.safetensors  # smoke test

``--clip`` names the teacher config ``conf/clip/<name>.yaml``: its ``model_cfg`` is the
architecture and its ``pretrained`` asset the default output; the knobs default to the shipped
model's recipe (``zeroseg.toy.clip.ToyPretrainingConfig``). The class list
and unseen split are read from the packaged ``conf/dataset/synthetic.yaml``. Prints the zero-shot
crop accuracy as it trains and a final evaluation on fresh data, and writes ``<out>.json`` with
the report. Deterministic on CPU for a given --seed and --threads. Run times: see README.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import OmegaConf

from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.toy.clip import ToyPretrainingConfig, evaluate_toy_clip, save_toy_clip, toy_model_cfg, train_toy_clip


def default_output(clip: str) -> Path:
    """The shipped weight file of ``conf/clip/<clip>.yaml`` (its ``${asset:...}``, resolved by ``import zeroseg``)."""
    return Path(str(OmegaConf.load(str(files("zeroseg") / "conf" / "clip" / f"{clip}.yaml")).pretrained))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="toy", help="the toy CLIP config conf/clip/<name>.yaml to train")
    parser.add_argument("--out", type=Path, default=None, help="default: the config's shipped asset")
    parser.add_argument("--pretrain-classes", choices=["all", "seen"], default="all")
    for knob in ("steps", "batch_size", "bank_size"):
        parser.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None)
    for knob in ("lr", "dense_loss_weight", "token_loss_weight"):
        parser.add_argument(f"--{knob.replace('_', '-')}", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kind-weights", type=float, nargs=6, default=None, help="sampling weights of SAMPLE_KINDS, in order")
    parser.add_argument("--pool", choices=["tok", "avg"], default=None, help="default: the config's pool_type")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    dataset_cfg = OmegaConf.load(str(files("zeroseg") / "conf" / "dataset" / "synthetic.yaml"))
    class_names = list(dataset_cfg.split.class_names)
    unseen = list(dataset_cfg.split.unseen_class_names)
    pretrain_names = class_names if args.pretrain_classes == "all" else [c for c in class_names if c not in unseen]
    model_cfg = toy_model_cfg(args.clip)
    if args.pool:
        model_cfg["vision_cfg"]["pool_type"] = args.pool
    knobs = asdict(ToyPretrainingConfig())
    knobs.update({k: v for k, v in vars(args).items() if k in knobs and v is not None})
    knobs["kind_weights"] = tuple(knobs["kind_weights"])
    config = ToyPretrainingConfig(**knobs)
    model, report = train_toy_clip(class_names, pretrain_names, config, model_cfg)
    path = save_toy_clip(model, args.out or default_output(args.clip))
    teacher = CLIPTeacher(arch="toy", pretrained=str(path), model_cfg=model_cfg)
    report["evaluation"] = evaluate_toy_clip(teacher, class_names, unseen)
    report["model_cfg"] = model_cfg
    report["pretraining"] = asdict(config)
    report["file_megabytes"] = path.stat().st_size / 1e6
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("bank_seconds", "train_seconds", "file_megabytes", "evaluation")}, indent=2))


if __name__ == "__main__":
    main()
