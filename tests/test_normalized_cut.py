"""Panoptic Cut (LaVG's iterative Normalized Cut, CLIP-to-Seg Table XII ref. [48]): the eigenvector against scipy's
generalised eigen-solver, the connected component against scipy.ndimage, a whole cut sequence against a NumPy/SciPy
re-implementation of LaVG's ``panoptic_cut_forward`` loop, and clusters that must be split exactly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from zeroseg.toolkit.normalized_cut import ncut_eigenvector, panoptic_cut, seed_component, thresholded_affinity
from zeroseg.toolkit.pseudo_masks import panoptic_cut_pseudo_masks


def _scipy_fiedler(weights: np.ndarray) -> np.ndarray:
    """Second-smallest solution of (D - W) y = λ D y, scipy's normalisation yᵀDy = 1."""
    return _scipy_fiedler_and_gap(weights)[0]


def _scipy_fiedler_and_gap(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """The Fiedler vector and the distance of its eigenvalue to its neighbours (0: not unique)."""
    degree = np.diag(weights.sum(axis=1))
    values, vectors = scipy.linalg.eigh(degree - weights, degree)
    gap = min(values[1] - values[0], values[2] - values[1]) if len(values) > 2 else values[1] - values[0]
    return vectors[:, 1], float(gap)


def test_ncut_eigenvector_matches_scipy_generalized_eigh_on_the_valid_subgraph() -> None:
    rng = np.random.default_rng(0)
    nodes = 10
    affinities, valids = [], []
    for _ in range(2):
        raw = rng.random((nodes, nodes))
        affinities.append((raw + raw.T) / 2)
        valids.append(rng.random(nodes) > 0.3)
    valids[1][:] = True
    result = ncut_eigenvector(torch.tensor(np.stack(affinities)), torch.tensor(np.stack(valids))).double().numpy()
    for weights, valid, ours in zip(affinities, valids, result):
        expected = _scipy_fiedler(weights[np.ix_(valid, valid)])
        sign = np.sign(expected @ ours[valid])
        np.testing.assert_allclose(sign * ours[valid], expected, atol=1e-4)
        assert np.all(ours[~valid] == 0)


def test_thresholded_affinity_is_lavg_binary_graph() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1, 7, 4))
    normalized = features[0] / np.linalg.norm(features[0], axis=1, keepdims=True)
    expected = np.where(normalized @ normalized.T > 0.2, 1.0, 1e-5)
    ours = thresholded_affinity(torch.tensor(features), tau=0.2, eps=1e-5)[0].double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_seed_component_is_scipy_4_connected_label() -> None:
    rng = np.random.default_rng(2)
    masks = rng.random((4, 9, 11)) > 0.45
    seeds = []
    for mask in masks:
        seeds.append(int(rng.choice(np.flatnonzero(mask))))
    ours = seed_component(torch.tensor(masks), torch.tensor(seeds)).numpy()
    for mask, seed, component in zip(masks, seeds, ours):
        labelled, _ = scipy.ndimage.label(mask)  # default structure: 4-connectivity
        expected = labelled == labelled.flat[seed]
        assert np.array_equal(component, expected)
    # a seed outside the foreground gives nothing
    empty = seed_component(torch.zeros(1, 3, 3, dtype=torch.bool), torch.tensor([4]))
    assert not empty.any()


def _lavg_reference(
    features: np.ndarray, valid: np.ndarray, max_masks: int, tau: float, min_remaining: int
) -> tuple[np.ndarray, int]:
    """LaVG's ``panoptic_cut_forward`` loop in NumPy/SciPy on one image (features (D, h, w)), started from the
    positions of ``valid``: segment index per position (the remainder last, -1 outside ``valid``) and how many
    leading cuts had a unique Fiedler vector (after a degenerate one any eigenvector is as right)."""
    dims, _ = features.shape[1:], None
    flat = features.reshape(features.shape[0], -1).T
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    free = valid.reshape(-1).copy()
    segments = np.full(free.shape, -1)
    count, unique = 0, None
    for _ in range(max_masks):
        if free.sum() <= min_remaining:
            break
        sub = flat[free]
        weights = np.where(sub @ sub.T > tau, 1.0, 1e-5)
        vector, gap = _scipy_fiedler_and_gap(weights)
        if gap < 1e-6 and unique is None:
            unique = count
        part = vector > vector.mean()
        full_part = np.zeros(free.shape, bool)
        full_part[free] = part
        full_vec = np.zeros(free.shape)
        full_vec[free] = vector
        peak = np.flatnonzero(free)[np.argmax(np.abs(vector))]
        grid = full_part.reshape(dims)
        corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
        reverse = corners >= 3 or not full_part[peak]
        if reverse:
            full_vec = -full_vec
            full_part = np.zeros(free.shape, bool)
            full_part[free] = ~part
        seed = np.flatnonzero(free)[np.argmax(full_vec[free])]
        labelled, _ = scipy.ndimage.label(full_part.reshape(dims))
        mask = (labelled == labelled.flat[seed]).reshape(-1)
        segments[mask] = count
        count += 1
        free &= ~mask
    segments[free] = count
    return segments.reshape(dims), count if unique is None else unique


def test_panoptic_cut_follows_lavg_loop_against_a_scipy_reimplementation() -> None:
    rng = np.random.default_rng(0)
    h = w = 10
    # smooth random fields: neighbouring positions similar, no cliques of identical features
    features = scipy.ndimage.gaussian_filter(rng.normal(size=(4, 16, h, w)), sigma=(0, 0, 1.5, 1.5))
    valid = np.ones((4, h, w), bool)
    valid[1, :3, :] = False  # positions annotated with a seen class are not in the graph
    valid[2, :, 7:] = False
    ours = panoptic_cut(torch.tensor(features), torch.tensor(valid), max_masks=5, tau=0.5).numpy()
    compared = 0
    for image in range(4):
        expected, unique_cuts = _lavg_reference(features[image], valid[image], max_masks=5, tau=0.5, min_remaining=5)
        for cut in range(unique_cuts):  # every cut whose eigenvector is determined must be LaVG's
            assert np.array_equal(ours[image] == cut, expected == cut), (image, cut)
        if unique_cuts == 5:
            assert np.array_equal(ours[image], expected), image
        compared += unique_cuts
        assert (ours[image][~valid[image]] == -1).all()
    assert compared >= 8, "too few determined cuts to compare: change the seed"


def test_two_separated_clusters_are_split_exactly_and_stay_pure() -> None:
    generator = torch.Generator().manual_seed(4)
    h, w = 6, 8
    a, b = torch.zeros(12), torch.zeros(12)
    a[0], b[1] = 1.0, 1.0
    features = torch.empty(2, 12, h, w)
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    top = torch.zeros(h, w, dtype=torch.bool)
    top[: h // 2] = True
    for image, side in enumerate((left, top)):
        features[image] = torch.where(side, a[:, None, None], b[:, None, None]) + 0.05 * torch.randn(
            12, h, w, generator=generator
        )
    valid = torch.ones(2, h, w, dtype=torch.bool)
    one_cut = panoptic_cut(features, valid, max_masks=1, tau=0.5)
    for image, side in enumerate((left, top)):
        segments = one_cut[image]
        assert set(segments.unique().tolist()) == {0, 1}
        assert segments[side].unique().numel() == 1 and segments[~side].unique().numel() == 1
        assert segments[side][0] != segments[~side][0]
    many = panoptic_cut(features, valid, max_masks=8, tau=0.5)
    for image, side in enumerate((left, top)):
        for segment in many[image].unique().tolist():
            inside = many[image] == segment
            assert bool((inside & side).any()) != bool((inside & ~side).any()), "a segment mixes both clusters"


def test_panoptic_cut_pseudo_masks_never_cover_seen_pixels() -> None:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 8, 8, 8, generator=generator)
    labels = torch.full((2, 32, 32), 255)
    labels[0, :16] = 1
    out = panoptic_cut_pseudo_masks(features, labels, num_seen=3, tau=0.0, max_masks=2)
    seen = labels != 255
    assert torch.equal(out[seen], labels[seen])
    assert (out[~seen] >= 3).all()  # the remainder keeps every unannotated pixel in some latent class
    assert out[1].unique().tolist() == [3, 4, 5]  # two cuts and the remainder
    dropped = panoptic_cut_pseudo_masks(features, labels, num_seen=3, tau=0.0, max_masks=2, keep_remainder=False)
    assert dropped[1].unique().tolist() == [3, 4, 255]


def test_corner_rule_takes_the_object_not_the_frame() -> None:
    # a one-position frame (28 positions, all four corners) around a 6x6 object: the frame is the smaller side,
    # so the eigenvector peaks there; LaVG's corner rule flips the cut to the object
    generator = torch.Generator().manual_seed(6)
    frame = torch.ones(8, 8, dtype=torch.bool)
    frame[1:-1, 1:-1] = False
    a, b = torch.eye(12)[0], torch.eye(12)[1]
    features = torch.where(frame, a[:, None, None], b[:, None, None]) + 0.05 * torch.randn(12, 8, 8, generator=generator)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    cut = panoptic_cut(features[None], valid, max_masks=1, tau=0.5)[0]
    assert torch.equal(cut == 0, ~frame)
    without = panoptic_cut(features[None], valid, max_masks=1, tau=0.5, corner_rule=False)[0]
    assert torch.equal(without == 0, frame)


@pytest.mark.parametrize("bad", [{"eps": 0.0}, {"max_masks": -1}])
def test_panoptic_cut_rejects_bad_knobs(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        panoptic_cut(torch.randn(1, 4, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool), **bad)
