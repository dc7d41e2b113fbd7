"""Write a contact sheet of ZSS-Synth: the class legend, then scenes above their label maps.

    python scripts/show_synthetic.py [--out docs/images/zss_synth.png] [--scenes 8] [--scale 3]

Classes come from the packaged ``conf/dataset/synthetic.yaml``; unseen classes are marked with *.
Scenes are the first ones of the training split (seeds 0, 1, ...).
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from zeroseg.toy.scenes import SceneConfig, parse_concept, render_concept, render_scene

PALETTE = (np.random.default_rng(7).random((256, 3)) * 200 + 40).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/zss_synth.png"))
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--scale", type=int, default=3)
    args = parser.parse_args()
    cfg = OmegaConf.load(str(files("zeroseg") / "conf" / "dataset" / "synthetic.yaml"))
    names = list(cfg.split.class_names)
    unseen = set(cfg.split.unseen_class_names)
    scene = SceneConfig.from_mapping(cfg.train_dataset.scene)
    size = scene.image_size

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    swatch_size, label_height = size, 22
    columns = max(args.scenes, 8)
    legend_rows = -(-len(names) // columns)
    width = columns * size
    height = legend_rows * (swatch_size + label_height) + 2 * size
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, name in enumerate(names):
        texture = render_concept(*parse_concept(name), xx, yy, np.random.default_rng(index))
        swatch = Image.fromarray((np.clip(texture, 0, 1) * 255).astype(np.uint8))
        x, y = (index % columns) * size, (index // columns) * (swatch_size + label_height)
        sheet.paste(swatch, (x, y + label_height))
        # a strip in the class's label colour ties the legend to the label maps
        draw.rectangle([x, y, x + size - 1, y + label_height - 1], fill=tuple(int(c) for c in PALETTE[index]))
        draw.text((x + 1, y), ("*" if name in unseen else "") + name.replace(" ", "\n"), fill=(0, 0, 0), spacing=0)
    top = legend_rows * (swatch_size + label_height)
    for index in range(args.scenes):
        image, label = render_scene(names, index, scene)
        sheet.paste(Image.fromarray(image), (index * size, top))
        sheet.paste(Image.fromarray(PALETTE[label]), (index * size, top + size))
    sheet = sheet.resize((width * args.scale, height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(names)} classes, {len(unseen)} unseen marked *, {args.scenes} scenes)")


if __name__ == "__main__":
    main()
