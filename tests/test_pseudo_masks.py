"""Pseudo masks (CLIP-to-Seg Sec. III-B): window seeds, Algorithm 1, the batched generator."""

from __future__ import annotations

import numpy as np
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


def test_latent_masks_respect_seen_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 8, 8, 8, generator=generator)
    features[:, :, :, 4:] += 4 * torch.randn(1, 8, 1, 1, generator=generator)
    labels = torch.full((3, 32, 32), 255)
    labels[0, :16, :16] = 0
    labels[1, 16:, :] = 2
    labels[2] = 1  # every pixel seen: no latent region at all
    batched = generate_pseudo_masks(features, labels, num_seen=3, threshold=0.5, keep_singletons=True)
    seen = labels != 255
    assert torch.equal(batched[seen], labels[seen])  # latent masks never cover a seen pixel
    assert ((batched[~seen] >= 3) | (batched[~seen] == 255)).all()
    assert torch.equal(batched[2], labels[2]) and (batched[0][~seen[0]] >= 3).any()


def test_all_ignore_and_empty_inputs_do_not_crash() -> None:
    features = torch.randn(2, 4, 8, 8)
    labels = torch.full((2, 16, 16), 255)
    out = generate_pseudo_masks(features, labels, num_seen=2)
    assert out.shape == labels.shape and ((out >= 2) | (out == 255)).all()


def numpy_pseudo_masks(features, labels, num_seen, window_sizes, iterations, threshold, keep_singletons):
    """An independent reading of CLIP-to-Seg Sec. III-B / Alg. 1 / METHODS.md, one image, NumPy loops:
    features ``(D, h, w)``, labels ``(H, W)`` -> Ỹ ``(H, W)``. Written from the paper, not from the module."""
    dim, gh, gw = features.shape
    big_h, big_w = labels.shape
    # label map on the feature grid: the pixel each grid cell's nearest-neighbour resize reads
    rows = [int(np.floor(r * big_h / gh)) for r in range(gh)]
    cols = [int(np.floor(c * big_w / gw)) for c in range(gw)]
    free = np.array([[labels[r, c] == 255 for c in cols] for r in rows])
    zeroed = features * free  # Eq. 2: annotated positions carry no feature
    seeds = []
    for k in window_sizes:  # every k x k window, stride floor(k / 2), is a seed
        step = max(k // 2, 1)
        for top in range(0, gh - k + 1, step):
            for left in range(0, gw - k + 1, step):
                seeds.append(zeroed[:, top : top + k, left : left + k].mean(axis=(1, 2)))
    unit = lambda v: v / max(np.linalg.norm(v), 1e-12)  # noqa: E731
    usable = [np.linalg.norm(v) > 0 for v in seeds]  # a window on annotated positions only is no seed
    centres = [unit(v) for v in seeds]
    points = {(r, c): unit(zeroed[:, r, c]) for r in range(gh) for c in range(gw) if free[r, c]}
    owner = {}
    for _ in range(iterations):  # cosine K-means; an emptied cluster keeps its centre
        for position, vector in points.items():
            best, best_similarity = -1, -np.inf
            for index, centre in enumerate(centres):
                if usable[index] and float(vector @ centre) > best_similarity:
                    best, best_similarity = index, float(vector @ centre)
            owner[position] = best
        for index in range(len(centres)):
            members = [points[p] for p in points if owner[p] == index]
            if members:
                centres[index] = unit(np.mean(members, axis=0))
    alive = [i for i in range(len(centres)) if any(owner[p] == i for p in points)]
    # Algorithm 1 over the non-empty clusters
    similarity = {(i, j): float(centres[i] @ centres[j]) for i in alive for j in alive if i != j}
    remaining, group, groups = set(alive), {}, 0
    while True:
        pairs = [(similarity[i, j], i, j) for i in sorted(remaining) for j in sorted(remaining) if i != j]
        if not pairs or max(p[0] for p in pairs) < threshold:
            break
        top = max(p[0] for p in pairs)
        row = next(i for value, i, _ in pairs if value == top)  # first maximum, row-major
        merged = {row} | {j for j in remaining if j != row and similarity[row, j] > threshold}
        for member in merged:
            group[member] = groups
        groups += 1
        remaining -= merged
    if keep_singletons:
        for cluster in sorted(remaining):
            group[cluster] = groups
            groups += 1
    out = labels.copy()
    for y in range(big_h):
        for x in range(big_w):
            if labels[y, x] != 255:
                continue  # seen labels always win
            cell = (int(np.floor(y * gh / big_h)), int(np.floor(x * gw / big_w)))
            out[y, x] = num_seen + group[owner[cell]] if cell in owner and owner[cell] in group else 255
    return out


def test_batched_generator_equals_an_independent_numpy_reference() -> None:
    generator = torch.Generator().manual_seed(5)
    # four weak concepts in quadrants plus noise: the clusters, their merges and the singletons all
    # depend on every detail (seeds, strides, empty clusters, Algorithm 1's order)
    features = torch.randn(4, 16, 8, 8, generator=generator)
    for top, left in ((0, 0), (0, 4), (4, 0), (4, 4)):
        features[:, :, top : top + 4, left : left + 4] += 1.5 * torch.randn(4, 16, 1, 1, generator=generator)
    labels = torch.full((4, 32, 32), 255)
    labels[0, :12, :12] = 1
    labels[1, 20:, 5:25] = 0
    labels[3] = 2
    options = dict(window_sizes=(3, 5), iterations=3, threshold=0.5)
    for keep in (False, True):
        batched = generate_pseudo_masks(features, labels, num_seen=3, keep_singletons=keep, **options)
        for index in range(4):
            reference = numpy_pseudo_masks(features[index].double().numpy(), labels[index].numpy(), 3, keep_singletons=keep, **options)
            assert (batched[index].numpy() == reference).all(), (keep, index)
        assert (batched >= 3).any()  # latent classes were found, so the comparison is not vacuous
        assert len(set(batched[0][batched[0] >= 3].tolist())) >= 1
