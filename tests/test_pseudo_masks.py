"""Pseudo masks (CLIP-to-Seg Sec. III-B): window seeds, Algorithm 1, the batched generator."""

from __future__ import annotations

import torch

from zeroseg.toolkit import generate_pseudo_masks, merge_by_similarity, window_seeds

NEG = float("-inf")


def test_window_seeds_by_hand() -> None:
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    seeds = window_seeds(grid, [3])  # stride 1: four windows
    expected = [grid[0, 0, r : r + 3, c : c + 3].mean() for r in range(2) for c in range(2)]
    assert torch.allclose(seeds[0, :, 0], torch.stack(expected))
    both = window_seeds(grid, [2, 4])  # k=2: stride 1, 3x3 windows; k=4: stride 2, one window
    assert both.shape == (1, 9 + 1, 1) and both[0, -1, 0] == grid.mean()


def merge(matrix: list[list[float]], threshold: float = 0.9, keep_singletons: bool = False, valid=None) -> list[int]:
    similarity = torch.tensor(matrix).unsqueeze(0)
    valid = torch.ones(1, len(matrix), dtype=torch.bool) if valid is None else torch.tensor([valid])
    return merge_by_similarity(similarity, valid, threshold, keep_singletons)[0].tolist()


def test_algorithm_1_on_hand_built_similarities() -> None:
    # two groups, formed strongest first
    two = [[1, 0.99, 0.1, 0.1], [0.99, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.93], [0.1, 0.1, 0.93, 1]]
    assert merge(two) == [0, 0, 1, 1]
    # a chain 0-1-2 with 0-2 weak: row 0 takes 1; 2 is left alone and dropped (literal) or kept
    chain = [[1, 0.95, 0.5], [0.95, 1, 0.95], [0.5, 0.95, 1]]
    assert merge(chain) == [0, 0, -1]
    assert merge(chain, keep_singletons=True) == [0, 0, 1]
    # the row of the maximum takes every j above λ at once, even if j and k are not similar
    star = [[1, 0.97, 0.95], [0.97, 1, 0.2], [0.95, 0.2, 1]]
    assert merge(star) == [0, 0, 0]
    # all below λ: nothing merged
    low = [[1, 0.5], [0.5, 1]]
    assert merge(low) == [-1, -1] and merge(low, keep_singletons=True) == [0, 1]
    # exactly λ: the loop runs (max ≥ λ) but j is not > λ, so i forms a group alone
    tie = [[1, 0.9], [0.9, 1]]
    assert merge(tie) == [0, -1]
    # invalid (empty) clusters never take part
    assert merge(two, valid=[True, False, True, True]) == [-1, -1, 0, 0]


def test_batched_generator_equals_image_by_image_and_respects_seen_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 8, 8, 8, generator=generator)
    # two latent "concepts": make the right half of every image one direction
    features[:, :, :, 4:] += 4 * torch.randn(1, 8, 1, 1, generator=generator)
    labels = torch.full((3, 32, 32), 255)
    labels[0, :16, :16] = 0
    labels[1, 16:, :] = 2
    labels[2] = 1  # every pixel seen: no latent region at all
    batched = generate_pseudo_masks(features, labels, num_seen=3, threshold=0.5, keep_singletons=True)
    for index in range(3):
        single = generate_pseudo_masks(
            features[index : index + 1], labels[index : index + 1], num_seen=3, threshold=0.5, keep_singletons=True
        )
        assert torch.equal(batched[index], single[0])
    seen = labels != 255
    assert torch.equal(batched[seen], labels[seen])  # latent masks never cover a seen pixel
    latent = batched[~seen]
    assert ((latent >= 3) | (latent == 255)).all()
    assert torch.equal(batched[2], labels[2])
    assert (batched[0][~seen[0]] >= 3).any()  # image 0 does get latent classes


def test_all_ignore_and_empty_inputs_do_not_crash() -> None:
    features = torch.randn(2, 4, 8, 8)
    labels = torch.full((2, 16, 16), 255)
    out = generate_pseudo_masks(features, labels, num_seen=2)
    assert out.shape == labels.shape and ((out >= 2) | (out == 255)).all()


def test_batched_generator_equals_the_plain_numpy_reference() -> None:
    from zeroseg.toolkit.pseudo_masks import generate_pseudo_masks_reference

    generator = torch.Generator().manual_seed(5)
    features = torch.randn(4, 16, 8, 8, generator=generator)
    features[:, :, 4:, :] += 3 * torch.randn(4, 16, 1, 1, generator=generator)
    labels = torch.full((4, 32, 32), 255)
    labels[0, :12, :12] = 1
    labels[1, 20:, 5:25] = 0
    labels[3] = 2
    options = dict(window_sizes=(3, 5), iterations=6, threshold=0.6)
    for keep in (False, True):
        batched = generate_pseudo_masks(features, labels, num_seen=3, keep_singletons=keep, **options)
        for index in range(4):
            reference = generate_pseudo_masks_reference(
                features[index].numpy(), labels[index].numpy(), num_seen=3, keep_singletons=keep, **options
            )
            assert (batched[index].numpy() == reference).all(), (keep, index)
        assert (batched >= 3).any()  # latent classes were found, so the comparison is not vacuous
