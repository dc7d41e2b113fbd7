"""Batched K-means against a per-image NumPy Lloyd loop with the same initial centroids."""

from __future__ import annotations

import numpy as np
import torch

from zeroseg.toolkit import batched_kmeans, sample_initial_centroids


def numpy_lloyd(points: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    points = points / np.linalg.norm(points, axis=1, keepdims=True)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    for _ in range(iterations):
        assignment = np.argmax(points @ centroids.T, axis=1)
        for k in range(len(centroids)):
            members = points[assignment == k]
            if len(members):
                mean = members.mean(0)
                centroids[k] = mean / np.linalg.norm(mean)
    return np.argmax(points @ centroids.T, axis=1)


def test_matches_a_per_image_loop_with_padding_and_invalid_points() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, num_points, dim, k = 3, 40, 8, 5
    points = torch.randn(batch, num_points, dim, generator=generator)
    valid = torch.rand(batch, num_points, generator=generator) > 0.2
    valid[2, 30:] = False  # an image with fewer points (padding)
    centroids, centroid_valid = sample_initial_centroids(points, valid, k, generator)
    centroid_valid[1, -1] = False  # an image with one centroid fewer
    assignment, _, sizes = batched_kmeans(points, valid, centroids, centroid_valid, iterations=7)
    for b in range(batch):
        usable = centroid_valid[b].numpy()
        expected = numpy_lloyd(
            points[b][valid[b]].numpy().astype(np.float64), centroids[b][centroid_valid[b]].numpy().astype(np.float64), 7
        )
        got = assignment[b][valid[b]].numpy()
        # map through the indices of the usable centroids
        np.testing.assert_array_equal(got, np.flatnonzero(usable)[expected])
        assert (assignment[b][~valid[b]] == -1).all()
        assert int(sizes[b].sum()) == int(valid[b].sum())


def test_recovers_well_separated_clusters_and_reports_empty_ones() -> None:
    directions = torch.eye(4)
    points = directions.repeat_interleave(10, dim=0) + 0.01 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    points = points[None]
    valid = torch.ones(1, 40, dtype=torch.bool)
    # six initial centroids for four clusters: the two pointing away from all data end up empty
    centroids = torch.cat([directions, -directions[:2]])[None]
    assignment, _, sizes = batched_kmeans(points, valid, centroids, torch.ones(1, 6, dtype=torch.bool), iterations=5)
    assert sorted(sizes[0].tolist()) == [0, 0, 10, 10, 10, 10]
    for cluster in range(4):
        assert torch.unique(assignment[0, cluster * 10 : (cluster + 1) * 10]).numel() == 1


def test_l2_kmeans_equals_scikit_learn_lloyd_from_the_same_centroids() -> None:
    from sklearn.cluster import KMeans

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 6, generator=generator) * 4
    points = (centres.repeat_interleave(30, 0) + torch.randn(150, 6, generator=generator)).double()
    initial = points[torch.randperm(150, generator=generator)[:5]]
    reference = KMeans(5, init=initial.numpy(), n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(points.numpy())
    assignment, centroids, sizes = batched_kmeans(
        points[None].float(),
        torch.ones(1, 150, dtype=torch.bool),
        initial[None].float(),
        torch.ones(1, 5, dtype=torch.bool),
        20,
        "l2",
    )
    assert (sizes > 0).all()  # no empty cluster, where scikit-learn would relocate a centroid
    np.testing.assert_array_equal(assignment[0].numpy(), reference.labels_)
    np.testing.assert_allclose(centroids[0].numpy(), reference.cluster_centers_, rtol=1e-4, atol=1e-4)
