"""``zeroseg.predict``: a trained checkpoint on arbitrary images and arbitrary class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from zeroseg.inference import SegmentationInference
from zeroseg.predict import parse_class_names, predict
from zeroseg.train import train

from conftest import compose_test_config

# the tiny run's model choices (conftest.TINY_OVERRIDES), the ones predict must be given
MODEL_OVERRIDES = ["method=baseline", "backbone=resnet10t", "method.head.width=32"]
# a seen class, an unseen class of the toy split, and two names that exist nowhere in the toy world
CLASSES = ["red stripes", "cyan grid", "pink dots", "green sky"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny baseline checkpoint and a folder of toy scenes saved as PNG (one larger, for windows)."""
    root = tmp_path_factory.mktemp("predict")
    torch.set_num_threads(1)
    cfg = compose_test_config(root / "train", ["test=false"])
    _, objects = train(cfg)
    GlobalHydra.instance().clear()
    images = root / "images"
    images.mkdir()
    dataset = objects["datamodule"].datasets["val"]
    for index in range(3):
        picture = (dataset[index]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(picture).save(images / f"scene{index}.png")
    # 48 x 64: larger than the 32-pixel windows of the slide test
    tiles = [np.asarray(Image.open(images / f"scene{k}.png")) for k in range(2)]
    Image.fromarray(np.concatenate([np.concatenate(tiles, 1)[:16], np.concatenate(tiles, 1)], 0)).save(root / "large.png")
    return {
        "root": root,
        "ckpt": Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        "images": images,
        "train_class_names": set(objects["model"].train_class_names),
        # the weights of last.ckpt, as training left them: predict must load exactly these
        "model": objects["model"].eval(),
    }


def predict_cfg(trained: dict, tmp_path: Path, overrides: list[str]):
    return compose_test_config(
        tmp_path, [f"ckpt_path={trained['ckpt']}", *MODEL_OVERRIDES, *overrides], config_name="predict", tiny=False
    )


def direct_prediction(model, image_file: Path, class_names: list[str], inference: SegmentationInference) -> np.ndarray:
    """The method's own segment() with these names' text embeddings in place of the dataset's."""
    picture = torch.from_numpy(np.array(Image.open(image_file).convert("RGB"))).permute(2, 0, 1).float().div(255)
    saved = model.class_text_embeddings, model.inference
    model.class_text_embeddings, model.inference = model.teacher.encode_text(class_names), inference
    try:
        with torch.no_grad():
            return model.segment(picture[None]).argmax(1)[0].numpy()
    finally:
        model.class_text_embeddings, model.inference = saved


def test_predict_writes_overlays_and_maps_of_the_methods_own_prediction(trained: dict, tmp_path: Path) -> None:
    # names the checkpoint never saw: the unseen toy class and two that exist nowhere
    assert [name for name in CLASSES if name not in trained["train_class_names"]] == CLASSES[1:]
    cfg = predict_cfg(trained, tmp_path, [f"inputs={trained['images']}", f'classes="{",".join(CLASSES)}"', "save_maps=true"])
    summary, objects = predict(cfg)
    out = Path(cfg.paths.output_dir)
    assert summary["class_names"] == CLASSES
    assert (out / "classes.txt").read_text().splitlines() == [f"{i} {name}" for i, name in enumerate(CLASSES)]
    assert [Path(r["input"]).name for r in summary["images"]] == ["scene0.png", "scene1.png", "scene2.png"]
    assert json.loads((out / "predictions.json").read_text())["images"] == summary["images"]
    predicted = set()
    for record in summary["images"]:
        name = Path(record["input"]).stem
        class_map = np.asarray(Image.open(out / "maps" / f"{name}.png"))
        expected = direct_prediction(trained["model"], Path(record["input"]), CLASSES, SegmentationInference("whole"))
        np.testing.assert_array_equal(class_map, expected)
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert overlay.width >= 256 and overlay.height > overlay.width  # enlarged, legend below
        shares = {CLASSES[c]: float((expected == c).mean()) for c in np.unique(expected)}
        assert record["classes"] == pytest.approx(shares)
        predicted |= set(shares)
    assert len(predicted) >= 2  # the maps are not one class everywhere


def test_classes_from_a_file_and_sliding_windows_on_a_larger_image(trained: dict, tmp_path: Path) -> None:
    names_file = tmp_path / "names.txt"
    names_file.write_text("# toy names\nred stripes\n\npink dots\n  green sky  \n")
    slide = ["inference=slide", "inference.crop_size=[32,32]", "inference.stride=[24,24]", "save_maps=true"]
    maps = []
    for k, classes in enumerate([f"classes=@{names_file}", f"classes_file={names_file}"]):
        cfg = predict_cfg(trained, tmp_path / str(k), [f"inputs={trained['root'] / 'large.png'}", classes, *slide])
        summary, objects = predict(cfg)
        assert summary["class_names"] == ["red stripes", "pink dots", "green sky"]
        maps.append(np.asarray(Image.open(Path(cfg.paths.output_dir) / "maps" / "large.png")))
    assert objects["model"].inference.mode == "slide"
    assert maps[0].shape == (48, 64)
    np.testing.assert_array_equal(maps[0], maps[1])
    large, names = trained["root"] / "large.png", summary["class_names"]
    windows = SegmentationInference("slide", crop_size=32, stride=24)
    np.testing.assert_array_equal(maps[0], direct_prediction(trained["model"], large, names, windows))
    # and the windows matter here: a whole-image pass gives another map
    assert not np.array_equal(maps[0], direct_prediction(trained["model"], large, names, SegmentationInference("whole")))


def test_an_unreadable_image_stops_the_run_before_any_output(trained: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = predict_cfg(trained, tmp_path, [f"inputs=[{trained['images'] / 'scene0.png'},{bad}]", 'classes="a,b"'])
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        predict(cfg)
    assert not (Path(cfg.paths.output_dir) / "overlays").exists()  # checked up front, not after the good images


@pytest.mark.parametrize(
    "overrides, error, names",
    [
        (["inputs={images}/nothing_*.png", 'classes="a,b"'], FileNotFoundError, "nothing_*.png"),
        (["inputs={images}/missing_dir", 'classes="a,b"'], FileNotFoundError, "missing_dir"),
        (["inputs={bad}", 'classes="a,b"'], ValueError, "bad.png"),
        (["inputs={images}", 'classes=" , "'], ValueError, "classes=' , '"),
        (["inputs={images}", "classes=@{tmp}/none.txt"], FileNotFoundError, "none.txt"),
        (["inputs={images}"], ValueError, "no classes given"),
        (["inputs={images}", 'classes="a,b"', "ckpt_path={tmp}/gone.ckpt"], FileNotFoundError, "gone.ckpt"),
    ],
)
def test_bad_input_names_the_value(trained: dict, tmp_path: Path, overrides: list[str], error: type, names: str) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    filled = [o.format(images=trained["images"], bad=bad, tmp=tmp_path) for o in overrides]
    cfg = predict_cfg(trained, tmp_path, filled)
    with pytest.raises(error, match=names.replace("*", r"\*").replace("(", r"\(")):
        predict(cfg)


def test_class_name_parsing() -> None:
    assert parse_class_names(" cat, dog ,,grass ") == ["cat", "dog", "grass"]
    assert parse_class_names(["cat", "red stripes"]) == ["cat", "red stripes"]
    with pytest.raises(ValueError, match=r"\['cat'\] more than once"):
        parse_class_names("cat,dog,cat")
    with pytest.raises(ValueError, match="either classes= or classes_file="):
        parse_class_names("cat", "names.txt")


def test_help_says_unseen_names_are_the_point() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("predict", return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert "never saw in training are the point" in cfg.hydra.help.header
    assert "python -m zeroseg.predict" in cfg.hydra.help.footer
