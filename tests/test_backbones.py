"""Backbones: MiT sizes, the Hugging Face oracle, weight files in the released layouts, and the
invariants every backbone option must satisfy."""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from zeroseg.models import MixTransformer, TimmBackbone

CONF = Path(__file__).resolve().parents[1] / "src" / "zeroseg" / "conf" / "backbone"
BACKBONE_OPTIONS = sorted(p.stem for p in CONF.glob("*.yaml"))


@pytest.mark.parametrize(
    "variant,millions", [("b0", 3.32), ("b1", 13.15), ("b2", 24.20), ("b3", 44.07), ("b4", 60.84), ("b5", 81.44)]
)
def test_mit_parameter_counts(variant: str, millions: float) -> None:
    model = MixTransformer(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_mit_equals_hugging_face_segformer_loaded_from_its_layout(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = transformers.SegformerModel(transformers.SegformerConfig()).eval()  # MiT-B0 sizes
    reference.save_pretrained(tmp_path / "mit-b0")
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True).hidden_states
    for source in (tmp_path / "mit-b0", tmp_path / "mit-b0" / "model.safetensors"):
        ours = MixTransformer("b0", pretrained=str(source), drop_path_rate=0.0).eval()
        with torch.no_grad():
            outputs = ours.forward_features(images)  # the HF model takes normalised pixels
        assert len(outputs) == 4
        for mine, theirs in zip(outputs, expected):
            assert mine.shape == theirs.shape
            assert (mine - theirs).abs().max() < 1e-4
    (tmp_path / "mit-b0" / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(ValueError, match="expected a SegFormer"):
        MixTransformer("b0", pretrained=str(tmp_path / "mit-b0"))


def to_nvlabs_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm PVTv2 keys → the keys of NVlabs' released mit_b*.pth (inverse of timm's filter)."""
    out = {}
    for key, value in state.items():
        key = key.replace("patch_embed.", "patch_embed1.")
        key = re.sub(r"stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", key)
        key = re.sub(r"stages\.(\d+)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
        key = key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        out[key] = value
    return out


def test_nvlabs_checkpoint_loads_completely_and_bad_files_fail_clearly(tmp_path: Path) -> None:
    source = MixTransformer("b0", drop_path_rate=0.0).eval()
    nvlabs = to_nvlabs_keys(source.body.state_dict())
    assert "block1.0.attn.kv.weight" in nvlabs and "patch_embed4.proj.weight" in nvlabs and "norm4.weight" in nvlabs
    nvlabs["head.weight"] = torch.zeros(1000, 256)  # ImageNet classifier, as in the released files
    nvlabs["head.bias"] = torch.zeros(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(nvlabs, path)
    loaded = MixTransformer("b0", pretrained=str(path), drop_path_rate=0.0).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(images), source(images)):
            assert torch.equal(a, b)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth.*could not read"):
        MixTransformer("b0", pretrained=str(truncated))
    other_size = tmp_path / "mit_b1.pth"
    torch.save(to_nvlabs_keys(MixTransformer("b1").body.state_dict()), other_size)
    with pytest.raises(ValueError, match=r"mit_b1.pth.*do not match the model's shapes"):
        MixTransformer("b0", pretrained=str(other_size))
    resnet = tmp_path / "resnet18.pth"
    torch.save(TimmBackbone("resnet18").body.state_dict(), resnet)
    with pytest.raises(ValueError, match="shares no key"):
        MixTransformer("b0", pretrained=str(resnet))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for i, (k, v) in enumerate(nvlabs.items()) if i % 2}, partial)
    with pytest.raises(ValueError, match="lacks .* of the model's tensors"):
        MixTransformer("b0", pretrained=str(partial))


def test_resnet_loads_a_torchvision_style_checkpoint_with_its_classifier(tmp_path: Path) -> None:
    source = TimmBackbone("resnet18")
    full = {**source.body.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(full, path)
    loaded = TimmBackbone("resnet18", pretrained=str(path))
    for name, tensor in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[name], tensor), name


@pytest.mark.parametrize("option", BACKBONE_OPTIONS)
def test_every_backbone_option_honours_the_interface(option: str) -> None:
    cfg = OmegaConf.load(CONF / f"{option}.yaml")
    backbone = hydra.utils.instantiate(cfg)
    assert backbone.head_width == cfg.head_width
    images = torch.rand(1, 3, 64, 96)  # non-square
    features = backbone(images)
    assert len(features) == len(backbone.channels) == len(backbone.strides)
    for feature, channels, stride in zip(features, backbone.channels, backbone.strides):
        assert feature.shape == (1, channels, 64 // stride, 96 // stride)
        assert torch.isfinite(feature).all()
    sum(f.float().mean() for f in features).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]


def test_vit_loads_an_open_clip_visual_tower_and_matches_its_blocks(tmp_path: Path) -> None:
    import open_clip

    from zeroseg.models import TimmViTBackbone

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path / "open_clip_vit_b16.pt"
    torch.save(clip.state_dict(), path)
    backbone = TimmViTBackbone("vit_base_patch16_clip_224", out_indices=(5, 11), pretrained=str(path), drop_path_rate=0.0)
    backbone.eval()
    images = torch.randn(1, 3, 224, 224)  # already normalised; open_clip's own forward needs 224
    with torch.no_grad():
        ours = backbone.forward_features(images)
        theirs = clip.visual.forward_intermediates(images, indices=[5, 11], intermediates_only=True)["image_intermediates"]
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape == (1, 768, 14, 14)
        assert (mine - reference).abs().max() < 1e-3


def test_warmup_poly_schedule_matches_the_mmseg_formula() -> None:
    from zeroseg.optim import WarmupPolyLR

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = WarmupPolyLR(optimizer, total_steps=100, power=1.0, warmup_steps=10, warmup_ratio=1e-6)
    seen = []
    for _ in range(101):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-6)
    assert seen[5] == pytest.approx((1 - 0.05) * (1 - 0.5 * (1 - 1e-6)))
    assert seen[10] == pytest.approx(0.9) and seen[50] == pytest.approx(0.5) and seen[100] == 0.0


def test_segformer_b4_trains_a_few_steps_with_the_segformer_recipe(make_cfg) -> None:
    from zeroseg.train import train

    cfg = make_cfg(
        ["experiment=segformer_recipe", "backbone=segformer_b4", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    )
    assert cfg.backbone.variant == "b4" and cfg.method.lr_multipliers.head == 10.0
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    optimizer = objects["trainer"].optimizers[0]
    rates = sorted({group["initial_lr"] for group in optimizer.param_groups})
    assert rates == pytest.approx([6e-5, 6e-4])


def test_vit_loads_a_timm_checkpoint_with_its_classifier(tmp_path: Path) -> None:
    import timm

    from zeroseg.models import TimmViTBackbone

    full = timm.create_model("vit_base_patch16_224", num_classes=1000)
    path = tmp_path / "vit_b16_timm.pth"
    torch.save(full.state_dict(), path)
    backbone = TimmViTBackbone(pretrained=str(path), out_indices=(11,), drop_path_rate=0.0).eval()
    for name, tensor in backbone.body.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    with pytest.raises(ValueError, match="lacks"):
        torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.3.")}, tmp_path / "cut.pth")
        TimmViTBackbone(pretrained=str(tmp_path / "cut.pth"))
