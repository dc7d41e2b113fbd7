from zeroseg.toolkit.kmeans import batched_kmeans, sample_initial_centroids
from zeroseg.toolkit.pseudo_masks import generate_pseudo_masks, merge_by_similarity, merge_clusters, window_seeds

__all__ = [
    "batched_kmeans",
    "generate_pseudo_masks",
    "merge_by_similarity",
    "merge_clusters",
    "sample_initial_centroids",
    "window_seeds",
]
