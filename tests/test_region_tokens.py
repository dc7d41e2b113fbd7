"""Region CLS tokens (Eq. 3) against per-region loops, and the CLS token bank (FIFO, DDP, resume)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroseg.toolkit import TokenBank, encode_regions, find_regions


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    labels = torch.full((2, 32, 32), 255)
    labels[0, :16] = 0
    labels[0, 16:, :10] = 5
    labels[1, 8:20, 8:30] = 2  # image 1: one region
    return images, labels


def test_find_regions_lists_image_label_pairs() -> None:
    _, labels = make_batch()
    image_index, region_label = find_regions(labels)
    assert image_index.tolist() == [0, 0, 1] and region_label.tolist() == [0, 5, 2]
    assert find_regions(torch.full((1, 4, 4), 255))[0].numel() == 0


@pytest.mark.parametrize("encoder", ["masked_image", "crop"])
def test_batched_regions_equal_a_per_region_loop(tiny_teacher, encoder: str) -> None:
    images, labels = make_batch()
    result = encode_regions(tiny_teacher, images, labels, encoder=encoder, crop_size=32, max_regions_per_forward=2)
    assert result.valid.tolist() == [[True, True], [True, False]]
    assert result.labels.tolist() == [[0, 5], [2, -1]]
    for b in range(2):
        for r in range(2):
            if not result.valid[b, r]:
                assert (result.tokens[b, r] == 0).all()
                continue
            label = int(result.labels[b, r])
            single = torch.where(labels[b : b + 1] == label, labels[b : b + 1], torch.full_like(labels[b : b + 1], 255))
            expected = encode_regions(tiny_teacher, images[b : b + 1], single, encoder=encoder, crop_size=32)
            torch.testing.assert_close(result.tokens[b, r], expected.tokens[0, 0], rtol=1e-4, atol=1e-5)
            if encoder == "masked_image":  # the literal Eq. 3
                reference = tiny_teacher.encode_image(images[b : b + 1] * (labels[b : b + 1] == label).unsqueeze(1))[0][0]
                torch.testing.assert_close(result.tokens[b, r], reference, rtol=1e-4, atol=1e-5)


def test_crop_encoder_crops_the_box_and_fills_with_the_mean_colour(tiny_teacher) -> None:
    from zeroseg.toolkit.region_tokens import _region_inputs

    images = torch.zeros(1, 3, 32, 32)
    images[0, :, 8:20, 4:28] = torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:20, 4:28] = True
    masks[0, 19, 27] = False  # a pixel of the box outside the region gets the mean colour
    fill = tiny_teacher.pixel_mean.view(3)
    crops = _region_inputs(images, masks, torch.tensor([0]), "crop", fill, crop_size=16)
    assert crops.shape == (1, 3, 16, 16)
    torch.testing.assert_close(crops[0, :, 4, 4], torch.tensor([0.9, 0.1, 0.2]))  # box interior
    assert (crops[0, :, -1, -1] - torch.tensor([0.9, 0.1, 0.2])).abs().max() > 0.05  # touched by the fill


def test_token_bank_is_fifo_and_survives_a_state_dict_round_trip() -> None:
    bank = TokenBank(size=4, dim=2)
    assert bank.tokens().shape == (0, 2)
    bank.push(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert bank.tokens()[:, 0].tolist() == [1, 2, 3]
    bank.push(torch.tensor([[4.0, 4], [5, 5]]))
    assert bank.tokens()[:, 0].tolist() == [2, 3, 4, 5]
    bank.push(torch.arange(12.0).view(6, 2))  # larger than the bank: the newest four stay
    assert bank.tokens()[:, 0].tolist() == [4, 6, 8, 10]
    restored = TokenBank(size=4, dim=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.tokens(), bank.tokens())
    restored.push(torch.tensor([[99.0, 99]]))
    bank.push(torch.tensor([[99.0, 99]]))
    assert torch.equal(restored.tokens(), bank.tokens())


def _ddp_bank_worker(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    bank = TokenBank(size=8, dim=1)
    bank.push(torch.tensor([[10.0 * rank + 1], [10.0 * rank + 2]]))
    bank.push(torch.tensor([[10.0 * rank + 3], [10.0 * rank + 4]]))
    queue.put((rank, bank.tokens()[:, 0].tolist()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_token_bank_gathers_across_two_processes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_ddp_bank_worker, args=(2, port, queue), nprocs=2, start_method="spawn", join=True)
    results = dict(queue.get() for _ in range(2))
    expected = [1.0, 2.0, 11.0, 12.0, 3.0, 4.0, 13.0, 14.0]  # rank order within each push, FIFO across pushes
    assert results[0] == results[1] == expected


def plain_block(block, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A pre-norm ViT block with masked multi-head attention, written out by hand."""
    attention = block.attn
    heads, width = attention.num_heads, x.shape[-1]
    head_dim = width // heads
    h = block.ln_1(x)
    q, k, v = (h @ attention.in_proj_weight.t() + attention.in_proj_bias).split(width, dim=-1)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + attention.out_proj(mixed)
    return x + block.mlp(block.ln_2(x))


def test_attention_encoder_equals_a_plain_masked_attention_per_region(tiny_teacher) -> None:
    images, labels = make_batch()
    result = encode_regions(tiny_teacher, images, labels, encoder="attention", from_layer=1)
    visual = tiny_teacher.model.visual
    with torch.no_grad():
        x, grid = tiny_teacher.embed_tokens(images)
        x = visual.transformer.resblocks[0](x)
        for b in range(2):
            for r in range(2):
                if not result.valid[b, r]:
                    assert (result.tokens[b, r] == 0).all()
                    continue
                # this region's mask on the 4x4 token grid: patches at least half covered
                region = (labels[b] == result.labels[b, r]).float()[None, None]
                on_grid = torch.nn.functional.avg_pool2d(region, 8).flatten() >= 0.5
                sequence = x[b : b + 1]  # [CLS, patches]: one copy for one region
                allowed = torch.ones(1, 17, 17, dtype=torch.bool)
                allowed[0, 0] = torch.cat([torch.tensor([True]), on_grid])
                allowed[0, 1:, 0] = False  # patches never see the CLS copy
                for block in visual.transformer.resblocks[1:]:
                    sequence = plain_block(block, sequence, allowed)
                expected = visual.ln_post(sequence[0, 0]) @ visual.proj
                torch.testing.assert_close(result.tokens[b, r], expected, rtol=1e-4, atol=1e-5)


def test_attention_encoder_needs_a_cls_pooled_teacher() -> None:
    from zeroseg.clip import CLIPTeacher
    from zeroseg.toy.clip import toy_model_cfg

    images, labels = make_batch()
    model_cfg = toy_model_cfg()
    model_cfg["vision_cfg"]["pool_type"] = "avg"
    mean_pooled = CLIPTeacher(arch="toy", random_init=True, model_cfg=model_cfg)
    with pytest.raises(ValueError, match="CLS-pooled teacher"):
        encode_regions(mean_pooled, images, labels, encoder="attention")


def test_masked_images_resized_to_masked_image_size_keep_their_aspect(tiny_teacher) -> None:
    """``masked_image_size``: the teacher sees Eq. 3's masked image resized (bilinear, antialiased) so its longer
    side is the given size; the token equals the teacher's CLS of that image computed here by hand."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 48, 32, generator=generator)
    labels = torch.full((1, 48, 32), 255)
    labels[0, 10:40, 4:20] = 3
    result = encode_regions(tiny_teacher, images, labels, encoder="masked_image", masked_image_size=24)
    masked = images * (labels == 3).unsqueeze(1)
    resized = torch.nn.functional.interpolate(masked, size=(24, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(result.tokens[0, 0], tiny_teacher.encode_image(resized)[0][0], rtol=1e-4, atol=1e-5)
    full = encode_regions(tiny_teacher, images, labels, encoder="masked_image")
    assert not torch.allclose(full.tokens, result.tokens)  # the size changes what the teacher sees
    with pytest.raises(ValueError, match="masked_image_size=0"):
        encode_regions(tiny_teacher, images, labels, encoder="masked_image", masked_image_size=0)


@pytest.mark.parametrize("encoder", ["masked_image", "crop"])
def test_encode_masks_equals_a_per_mask_loop(tiny_teacher, encoder: str) -> None:
    """Arbitrary binary masks (proposals): each valid slot is the teacher's CLS of that mask's input, built here
    by hand (masked image, or the mask's box filled with CLIP's mean colour outside the mask and resized)."""
    from torchvision.ops import roi_align

    from zeroseg.toolkit.region_tokens import encode_masks

    images, labels = make_batch()
    masks = torch.stack([torch.stack([labels[0] == 0, labels[0] == 5, labels[0] == 0]), torch.stack([labels[1] == 2] * 3)])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    tokens = encode_masks(tiny_teacher, images, masks, valid, encoder=encoder, crop_size=16, max_regions_per_forward=1)
    mean = tiny_teacher.pixel_mean.view(1, 3, 1, 1)
    for b, r in [(0, 0), (0, 1), (1, 0)]:
        mask = masks[b, r]
        if encoder == "masked_image":
            region = images[b : b + 1] * mask
        else:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            filled = torch.where(mask, images[b : b + 1], mean)
            box = torch.tensor([[0, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            region = roi_align(filled, box, output_size=(16, 16), spatial_scale=1.0, sampling_ratio=2, aligned=False)
        torch.testing.assert_close(tokens[b, r], tiny_teacher.encode_image(region)[0][0], rtol=1e-4, atol=1e-5)
    assert (tokens[~valid] == 0).all()
