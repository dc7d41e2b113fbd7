"""The ZSS data layer: splits, inductive/transductive labels, samplers, ZSS-Synth scenes."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from zeroseg.data import ClassSplit, ResumableTrainSampler, ShardedEvalSampler, ZSSDataModule
from zeroseg.toy import SyntheticScenes
from zeroseg.toy.scenes import COLOURS, SceneConfig, check_compositional_unseen, parse_concept, render_scene

NAMES = ["red stripes", "red dots", "orange dots", "orange checks", "yellow checks", "yellow noise", "green noise", "green rings"]
UNSEEN = ["red dots", "yellow noise"]


def make_datamodule(setting: str = "inductive", num_images: int = 24) -> ZSSDataModule:
    split = ClassSplit(NAMES, UNSEEN, name="toy")

    def factory(seed_base: int):
        return lambda: SyntheticScenes(NAMES, num_images=num_images, seed_base=seed_base, scene={"image_size": 32})

    dm = ZSSDataModule(split, factory(0), factory(1000), setting=setting, batch_size=4, eval_batch_size=5)
    dm.setup("fit")
    return dm


def test_inductive_training_targets_hold_no_unseen_class_and_names_are_the_seen_ones() -> None:
    dm = make_datamodule("inductive")
    seen = [n for n in NAMES if n not in UNSEEN]
    assert dm.train_class_names == tuple(seen)
    assert dm.class_names == tuple(NAMES)
    assert dm.unseen_class_ids == [1, 5]
    raw = dm.datasets["train"].dataset
    saw_unseen_pixels = False
    for batch in dm.train_dataloader():
        labels = batch["label"]
        values = set(torch.unique(labels).tolist())
        assert values <= set(range(len(seen))) | {255}
    for index in range(len(raw)):
        full = raw[index]["label"]
        mapped = dm.datasets["train"][index]["label"]
        unseen_mask = (full == 1) | (full == 5)
        saw_unseen_pixels |= bool(unseen_mask.any())
        assert bool((mapped[unseen_mask] == 255).all())
        # seen pixels map to the index of their name among the training names
        for full_id in torch.unique(full[~unseen_mask]).tolist():
            train_ids = torch.unique(mapped[full == full_id]).tolist()
            assert train_ids == [seen.index(NAMES[full_id])]
    assert saw_unseen_pixels, "the fixture should contain unseen pixels, else the test is vacuous"
    # evaluation keeps full labels
    val_labels = torch.cat([b["label"] for b in dm.val_dataloader()])
    assert {1, 5} & set(torch.unique(val_labels).tolist())


def test_transductive_gives_all_names_but_still_no_unseen_labels() -> None:
    dm = make_datamodule("transductive")
    assert dm.train_class_names == tuple(NAMES)
    for index in range(len(dm.datasets["train"])):
        full = dm.datasets["train"].dataset[index]["label"]
        mapped = dm.datasets["train"][index]["label"]
        unseen_mask = (full == 1) | (full == 5)
        assert bool((mapped[unseen_mask] == 255).all())
        assert torch.equal(mapped[~unseen_mask], full[~unseen_mask])


def test_split_errors_name_the_key_and_values() -> None:
    with pytest.raises(ValueError, match=r"unseen_class_names contains \['sofa'\].*not in split.class_names"):
        ClassSplit(["cat", "dog"], ["sofa"], name="pets")
    with pytest.raises(ValueError, match="more than once"):
        ClassSplit(["cat", "cat"], [])
    with pytest.raises(ValueError, match="every class is unseen"):
        ClassSplit(["cat"], ["cat"])
    with pytest.raises(ValueError, match="collides"):
        ClassSplit(["cat", "dog"], [], ignore_index=1)
    with pytest.raises(ValueError, match="setting"):
        ZSSDataModule(ClassSplit(["cat", "dog"], []), setting="semi")


def test_empty_dataset_is_an_error() -> None:
    split = ClassSplit(NAMES, UNSEEN, name="toy")
    dm = ZSSDataModule(split, lambda: [], lambda: [], batch_size=2)
    with pytest.raises(ValueError, match="'toy': the train split is empty"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="num_images=0"):
        SyntheticScenes(NAMES, num_images=0, seed_base=0)
    with pytest.raises(ValueError, match=r"scene options \['size'\] are unknown"):
        SyntheticScenes(NAMES, num_images=1, seed_base=0, scene={"size": 32})


def test_sharded_eval_sampler_covers_every_index_exactly_once() -> None:
    for size in (1, 5, 9, 10):
        for world in (1, 2, 3):
            seen = [i for rank in range(world) for i in ShardedEvalSampler(size, rank, world)]
            assert sorted(seen) == list(range(size))


def test_resumable_sampler_is_seeded_per_epoch_and_starts_mid_epoch() -> None:
    sampler = ResumableTrainSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    sampler.start_index = 4
    assert list(sampler) == first[4:]
    assert list(sampler) == first  # the offset applies to one pass only
    shards = [list(ResumableTrainSampler(9, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and set(shards[0]) | set(shards[1]) == set(range(9))


def test_synthetic_scenes_are_deterministic_and_splits_disjoint() -> None:
    a = SyntheticScenes(NAMES, num_images=4, seed_base=0, cache=False)
    b = SyntheticScenes(NAMES, num_images=4, seed_base=0, cache=False)
    for i in range(4):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=["seed=0"])
    ranges = []
    for stage in ("train", "val", "test"):
        node = OmegaConf.to_container(cfg.dataset[f"{stage}_dataset"], resolve=False)
        ranges.append(range(node["seed_base"], node["seed_base"] + node["num_images"]))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(ranges[i]) & set(ranges[j])
    # the shipped split makes every unseen class a new combination of seen colours and patterns
    check_compositional_unseen(list(cfg.dataset.split.class_names), list(cfg.dataset.split.unseen_class_names))
    GlobalHydra.instance().clear()


def test_synthetic_labels_match_the_painted_colour() -> None:
    checked = 0
    for seed in range(10):
        image, label = render_scene(NAMES, seed, SceneConfig(pixel_noise=0.0))
        pixels = image.reshape(-1, 3) / 255.0
        for class_id in np.unique(label):
            region = pixels[label.reshape(-1) == class_id]
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in region])
            bright = hsv[hsv[:, 2] > 0.6]
            if len(bright) < 5:
                continue
            hue = np.degrees(np.angle(np.mean(np.exp(1j * 2 * np.pi * bright[:, 0])))) % 360
            expected = COLOURS[parse_concept(NAMES[class_id])[0]]
            assert min(abs(hue - expected), 360 - abs(hue - expected)) < 15, (seed, NAMES[class_id], hue)
            checked += 1
    assert checked > 20
    _, label = render_scene(NAMES, 0)
    assert 3 <= len(np.unique(label)) <= 5  # background + 2..4 shapes


def test_synthetic_vocabulary_errors() -> None:
    with pytest.raises(ValueError, match="'red triangles'"):
        parse_concept("red triangles")
    check_compositional_unseen(NAMES, UNSEEN)
    with pytest.raises(ValueError, match="'pink waves'"):
        check_compositional_unseen(NAMES + ["pink waves"], ["pink waves"])


def test_every_class_appears_in_the_default_training_split() -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=["seed=0"])
    GlobalHydra.instance().clear()
    names = list(cfg.dataset.split.class_names)
    train = cfg.dataset.train_dataset
    counts = np.zeros(len(names), dtype=np.int64)
    for index in range(100):  # the first 100 of the 2,000 training scenes already hold every class
        _, label = render_scene(names, train.seed_base + index, SceneConfig.from_mapping(train.scene))
        counts += np.bincount(label.ravel(), minlength=len(names))
    assert (counts > 0).all(), dict(zip(names, counts.tolist()))


def test_synthetic_test_split_overlap_is_counted_by_seed() -> None:
    split = ClassSplit(NAMES, UNSEEN, name="toy")

    def scenes(seed_base: int, num_images: int):
        return lambda: SyntheticScenes(NAMES, num_images=num_images, seed_base=seed_base, scene={"image_size": 16})

    # val seeds 100..108, test seeds 104..114: 104..108 are shared, 5 scenes
    datamodule = ZSSDataModule(split, None, scenes(100, 9), scenes(104, 11))
    assert datamodule.test_shares_validation_images() == (True, "5 of the 11 test images are also validation images")
    disjoint = ZSSDataModule(split, None, scenes(100, 9), scenes(109, 11))
    assert disjoint.test_shares_validation_images()[0] is False
