"""The CLIP teacher: embeddings against open_clip's own forward, weights from local files, cache, errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from zeroseg.clip import CLIPTeacher, resolve_templates

from conftest import TINY_CLIP_CFG


def test_cls_matches_open_clip_and_dense_works_at_any_size(tiny_teacher: CLIPTeacher) -> None:
    images = torch.rand(2, 3, 32, 32)
    cls_embedding, dense = tiny_teacher.encode_image(images)
    reference = tiny_teacher.model.encode_image(tiny_teacher.normalize(images))
    torch.testing.assert_close(cls_embedding, reference, rtol=1e-5, atol=1e-5)
    assert dense.shape == (2, 32, 4, 4)
    # dense tokens are the open_clip output tokens after ln_post, times the projection
    visual = tiny_teacher.model.visual
    visual.output_tokens = True
    _, tokens = visual(tiny_teacher.normalize(images))
    visual.output_tokens = False
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens @ visual.proj, rtol=1e-5, atol=1e-5)
    cls_big, dense_big = tiny_teacher.encode_image(torch.rand(1, 3, 48, 72))
    assert dense_big.shape == (1, 32, 6, 9) and torch.isfinite(dense_big).all() and cls_big.shape == (1, 32)


def test_text_embeddings_are_normalised_ensembles_and_cached(tmp_path: Path) -> None:
    templates = ["a photo of a {}.", "a drawing of a {}."]
    teacher = CLIPTeacher(arch="tiny", random_init=True, model_cfg=TINY_CLIP_CFG, templates=templates, cache_dir=str(tmp_path))
    names = ["red stripes", "blue dots", "green noise"]
    embeddings = teacher.encode_text(names)
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    # by hand: mean of the normalised per-template embeddings, re-normalised
    with torch.no_grad():
        tokens = teacher.tokenizer([t.format(n) for n in names for t in templates])
        per_prompt = F.normalize(teacher.model.encode_text(tokens), dim=-1).reshape(3, 2, -1)
    torch.testing.assert_close(embeddings, F.normalize(per_prompt.mean(1), dim=-1), rtol=1e-5, atol=1e-6)
    cache_files = list(tmp_path.glob("text_*.pt"))
    assert len(cache_files) == 1
    # the cache is read back: a doctored file is returned as is
    torch.save(torch.zeros(3, 32), cache_files[0])
    assert torch.equal(teacher.encode_text(names), torch.zeros(3, 32))
    # another prompt set or other weights give another key
    other = CLIPTeacher(
        arch="tiny", random_init=True, random_init_seed=1, model_cfg=TINY_CLIP_CFG, templates=templates, cache_dir=str(tmp_path)
    )
    assert not torch.equal(other.encode_text(names), torch.zeros(3, 32))
    assert len(list(tmp_path.glob("text_*.pt"))) == 2


def test_random_init_is_reproducible_and_explicit() -> None:
    a = CLIPTeacher(arch="tiny", random_init=True, model_cfg=TINY_CLIP_CFG)
    torch.manual_seed(123)  # the global RNG must not matter
    b = CLIPTeacher(arch="tiny", random_init=True, model_cfg=TINY_CLIP_CFG)
    assert torch.equal(a.encode_text(["cat"]), b.encode_text(["cat"]))
    with pytest.raises(ValueError, match="clip.pretrained is not set"):
        CLIPTeacher(arch="tiny", model_cfg=TINY_CLIP_CFG)


@pytest.mark.parametrize("layout", ["state_dict", "wrapped_module_prefix", "safetensors", "torchscript"])
def test_loads_local_weights_in_the_released_layouts(tmp_path: Path, tiny_teacher: CLIPTeacher, layout: str) -> None:
    state = tiny_teacher.model.state_dict()
    if layout == "state_dict":
        path = tmp_path / "clip.pt"
        torch.save(state, path)
    elif layout == "wrapped_module_prefix":
        path = tmp_path / "clip.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "ViT-tiny.pt"
        # OpenAI's released files are TorchScript archives of the whole model
        scripted = torch.jit.script(tiny_teacher.model)
        scripted.save(str(path))
        assert zipfile.is_zipfile(path)
    loaded = CLIPTeacher(arch="tiny", pretrained=str(path), model_cfg=TINY_CLIP_CFG, random_init_seed=99)
    assert torch.equal(loaded.encode_text(["cat", "dog"]), tiny_teacher.encode_text(["cat", "dog"]))
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images)[0], tiny_teacher.encode_image(images)[0])


def test_weight_file_errors_name_the_file(tmp_path: Path, tiny_teacher: CLIPTeacher) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist.pt"):
        CLIPTeacher(arch="tiny", pretrained=str(tmp_path / "does-not-exist.pt"), model_cfg=TINY_CLIP_CFG)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        CLIPTeacher(arch="tiny", pretrained=str(garbage), model_cfg=TINY_CLIP_CFG)
    other_arch = dict(TINY_CLIP_CFG, embed_dim=16)
    wrong = tmp_path / "other.pt"
    torch.save(CLIPTeacher(arch="x", random_init=True, model_cfg=other_arch).model.state_dict(), wrong)
    with pytest.raises(ValueError, match=r"other.pt.*do not fit.*shape mismatches"):
        CLIPTeacher(arch="tiny", pretrained=str(wrong), model_cfg=TINY_CLIP_CFG)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        CLIPTeacher(arch="ViT-Nope", random_init=True)


def test_teacher_is_frozen_and_stays_in_eval_mode(tiny_teacher: CLIPTeacher) -> None:
    tiny_teacher.train()
    assert not tiny_teacher.training and not any(m.training for m in tiny_teacher.modules())
    assert not any(p.requires_grad for p in tiny_teacher.parameters())


def test_templates() -> None:
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert len(resolve_templates("vild")) == 14
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["a photo"])
    with pytest.raises(ValueError, match="not one of"):
        resolve_templates("nope")


def test_real_architecture_builds_without_a_hub() -> None:
    # ViT-B-16 layout with random weights: the shapes users' checkpoints must fit
    teacher = CLIPTeacher(arch="ViT-B-16", random_init=True)
    assert teacher.embed_dim == 512 and teacher.patch_size == (16, 16)
    assert isinstance(teacher.model, open_clip.CLIP)
